"""Reference micro-batches by length: the same gradient as any batching, a fraction of the padding,
and the ranks' shares balanced by tokens."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN, base_config, ogpsa_keys, ogpsa_log, run_cli, tiny_lm

from ogpsa.plugin.methods.gradient_span.gradients import reference_gradients
from ogpsa.plugin.reference import ReferenceSet, plan_batches

# lengths in tokens of real reference sets at cutoff 512 (GSM8K 134-414, Alpaca 38-512, HHH 46-512)
SPREADS = {"gsm8k": (134, 414), "alpaca": (38, 512), "hhh": (46, 512)}


def _lengths(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(*SPREADS[k]) for k in SPREADS for _ in range(n)]


def _padded(lengths: list[int], batch: int, multiple: int = 8) -> int:
    """Positions a right-padding collator processes (each batch padded to its longest, rounded up)."""
    total = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        total += len(chunk) * -(-max(chunk) // multiple) * multiple
    return total


def _plan_padded(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * -(-lengths[b[0]] // 8) * 8 for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_deals_every_sample_once_and_balances_ranks_by_tokens(world):
    for seed in range(3):
        for k in range(3):  # each set on its own, as a rebuild batches them
            lengths = sorted(_lengths(seed)[k * 100 : (k + 1) * 100], reverse=True)
            plan = plan_batches(lengths, 8, world)
            flat = [i for rank in plan for b in rank for i in b]
            assert sorted(flat) == list(range(len(lengths)))
            assert all(1 <= len(b) <= 8 and b == list(range(b[0], b[0] + len(b))) for rank in plan for b in rank)
            padded = [_plan_padded(lengths, rank) for rank in plan]
            assert sum(padded) / sum(lengths) <= 1.2
            # by tokens, not by count: greedy dealing keeps the ranks within one batch of each other
            largest = max(_plan_padded(lengths, [b]) for rank in plan for b in rank)
            assert max(padded) - min(padded) <= largest
            if world <= 2:
                assert max(padded) / min(padded) < 1.1


def test_planned_batches_pad_little_where_file_order_pads_a_lot():
    for seed in range(3):
        for n in (16, 100):  # the issue's run had 16 samples per set; the paper 100
            per_set = [_lengths(seed, n)[k * n : (k + 1) * n] for k in range(3)]
            real = sum(map(sum, per_set))
            file_order = sum(_padded(s, 8) for s in per_set) / real
            sorted_sets = [sorted(s, reverse=True) for s in per_set]
            planned = sum(_plan_padded(s, plan_batches(s, 8, 1)[0]) for s in sorted_sets) / real
            assert file_order > 1.4 and planned <= 1.2
            # a batch never needs more memory than a full batch of its longest sample did before
            assert all(len(b) <= 8 for s in sorted_sets for b in plan_batches(s, 8, 1)[0])


def _ragged_sets(gen: torch.Generator) -> list[ReferenceSet]:
    def row(n: int) -> dict:
        ids = torch.randint(1, 11, (n,), generator=gen).tolist()
        cut = max(1, n // 3)
        return {"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * cut + ids[cut:]}

    lengths = [int(x) for x in torch.randint(3, 40, (13,), generator=gen)]
    return [ReferenceSet("ragged", sorted((row(n) for n in lengths), key=lambda r: -len(r["input_ids"])))]


def pad_collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.tensor([r[k] + [v] * (width - len(r[k])) for r in rows]) for k, v in pad.items()}


def test_batched_gradient_equals_the_sum_of_per_sample_gradients():
    gen = torch.Generator().manual_seed(3)
    model, sets = tiny_lm(), _ragged_sets(gen)
    params = list(model.parameters())
    ref = sets[0]
    want = [torch.zeros_like(p) for p in params]
    answer = 0
    for row in ref.features:  # one sample at a time: no padding at all
        batch = pad_collate([row])
        n = int((batch["labels"][:, 1:] != -100).sum())
        for w, g in zip(want, torch.autograd.grad(model(**batch).loss * n, params)):
            w += g
        answer += n
    for batch_size in (1, 4, 5):
        (got,) = reference_gradients(model, params, sets, pad_collate, batch_size, torch.device("cpu"),
                                     lambda: [torch.zeros(p.numel()) for p in params])
        assert got.answer_tokens == answer
        assert got.input_tokens == sum(len(r["input_ids"]) for r in ref.features)
        lengths = [len(r["input_ids"]) for r in ref.features]
        assert got.padded_tokens == sum(len(b) * lengths[b[0]] for b in plan_batches(lengths, batch_size, 1)[0])
        for g, w in zip(got.rows, want):
            assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)


# ---- end to end: the rebuild on a set with a wide spread of lengths ---------------------------------


@pytest.fixture(scope="module")
def spread_data(tiny, tmp_path_factory) -> str:
    """The toy data plus `spread_ref`: 24 samples whose answers run from 2 to about 100 tokens, shuffled."""
    root = tmp_path_factory.mktemp("spread") / "data"
    shutil.copytree(tiny["data"], root)
    rng = random.Random(7)
    words = "the river runs past old mills and quiet fields toward the sea".split()
    rows = []
    for n in [2, 3, 5, 8, 12, 16, 20, 25, 30, 36, 42, 48, 55, 60, 66, 72, 78, 84, 88, 92, 96, 100, 4, 50]:
        rows.append({"instruction": f"Say {n} words.", "input": "", "output": " ".join(rng.choice(words) for _ in range(n))})
    rng.shuffle(rows)
    (root / "spread_ref.json").write_text(json.dumps(rows))
    info = json.loads((root / "dataset_info.json").read_text())
    info["spread_ref"] = {"file_name": "spread_ref.json"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return str(root)


def expected_norms(tiny, data_dir: str, names: list[str]) -> dict[str, tuple[float, int, int]]:
    """Per set: the norm of the mean answer-token NLL gradient, one sample at a time (no padding),
    its answer and input token counts."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.reference import tokenize_reference_sets

    args = base_config(tiny, Path(data_dir).parent / "_probe", dataset_dir=data_dir)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    sets = tokenize_reference_sets(names, 16, template, tokenizer, None, model_args, data_args, training_args)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model.train()
    collator = SFTDataCollatorWith4DAttentionMask(template=template, model=model, label_pad_token_id=-100,
                                                  tokenizer=tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for ref in sets:
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        answer = real = 0
        for row in ref.features:
            batch = collator([dict(row)])
            n = int((batch["labels"][:, 1:] != -100).sum())
            for t, g in zip(total, torch.autograd.grad(model(**batch).loss * n, params)):
                t += g.double()
            answer, real = answer + n, real + len(row["input_ids"])
        norm = float(torch.sqrt(sum((t / answer).square().sum() for t in total)))
        out[ref.name] = (norm, answer, real)
    return out


@pytest.mark.parametrize("procs", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
@pytest.mark.parametrize("workflow", ["sft", "dpo"])
def test_rebuild_pads_little_and_keeps_the_gradient(tiny, tmp_path, spread_data, workflow, procs):
    """The step-0 rebuild's per-set gradient norms and token counts equal one-sample-at-a-time
    values, on 1 process and under 2-process DDP (the ranks' shares summed)."""
    names = ["spread_ref", "toy_math_ref"]
    want = expected_norms(tiny, spread_data, names)
    out = tmp_path / "out"
    data = {"sft": "toy_safety_sft", "dpo": "toy_safety_dpo"}[workflow]
    cfg = base_config(tiny, out, dataset=data, dataset_dir=spread_data, max_steps=1,
                      **{**ogpsa_keys(), "stage": f"ogpsa_{workflow}", "ogpsa_reference": ",".join(names),
                         "ogpsa_reference_batch_size": 4})
    if procs == 2:
        cfg.update(ddp_backend="gloo", per_device_train_batch_size=2)
    run_cli(cfg, tmp_path / "run", env=TORCHRUN if procs == 2 else None)
    event = next(r for r in ogpsa_log(out) if r.get("event") == "rebuild")
    for name, (norm, answer, real) in want.items():
        assert event[f"tokens/{name}"] == answer and event[f"input_tokens/{name}"] == real
        assert event[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-5)
    ratio = event["padded_tokens/spread_ref"] / event["input_tokens/spread_ref"]
    print(f"{workflow} x{procs}: spread_ref padded/input {ratio:.3f}")
    assert ratio <= 1.2
