"""`ogpsa_reference_rotation: m`: each rebuild reads a 1/m share of every reference set, in turn, and the
subspace holds every share's latest gradient (m x sets directions, orthonormalised together).

Checked in this process on the tiny model (which samples each build reads, the basis' rank and
orthonormality, a projected step orthogonal to every share's gradient recomputed here at the weights it
was last read at), then through `llamafactory-cli train` (the rebuild log's token counts, a resume in
the middle of a rotation, and 2 DDP processes against 1).
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from helpers import (
    REFS,
    SAMPLES,
    TORCHRUN,
    base_config,
    cosine,
    deepspeed_config,
    load_state,
    max_diff,
    mean_nll_gradient,
    ogpsa_keys,
    ogpsa_log,
    one_and_two_processes,
    run_cli,
    tokenized_references,
)


def rotation_keys(m: int = 2, **overrides) -> dict:
    return ogpsa_keys(**{"ogpsa_reference_samples": SAMPLES, "ogpsa_reference_rotation": m, **overrides})


def test_each_rebuild_reads_its_share_and_the_basis_holds_every_shares_latest_gradient(tiny):
    """m = 2, 4 samples per set: the first build reads both shares (6 directions); each later build reads
    one share, in turn, and keeps the other's gradient from the basis. After every build the rows are
    orthonormal, and a projected step is orthogonal to each share's gradient at the weights it was read at
    (recomputed here, one sample at a time); two builds read what one full build reads."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.constraint import BuildContext, SetupContext
    from ogpsa.plugin.methods.gradient_span.maths import project_
    from ogpsa.plugin.methods.gradient_span.method import GradientSpan
    from ogpsa.plugin.settings import split_ogpsa_args
    from ogpsa.plugin.sharding import Replicated

    sets, make_collator = tokenized_references(tiny["model"], tiny, REFS, SAMPLES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    collator = make_collator(model)
    settings, _ = split_ogpsa_args(rotation_keys())
    span = GradientSpan(settings)
    span.setup(SetupContext(model=model, params=params, layout=Replicated(params), is_main=True))
    shares = span.shares(sets)
    assert [[g.name for g in share] for share in shares] == [[f"{n}@{s}" for n in REFS] for s in (0, 1)]
    for ref in sets:  # sample i of the longest-first order is in share i mod 2; together the whole set
        share0 = shares[0][REFS.index(ref.name)].features
        assert [f["input_ids"] for f in ref.features[0::2]] == [f["input_ids"] for f in share0]
        assert len(shares[1][REFS.index(ref.name)].features) == len(ref) // 2

    latest = {}  # share source name -> its gradient at the weights of its latest read
    events = []
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        if step:
            with torch.no_grad():  # the weights move between builds, so each share's gradient turns
                for p in params:
                    p.add_(3e-2 * torch.randn(p.shape, generator=gen) * p.detach().abs().mean())
        event = span.build(BuildContext(model=model, refs=sets, collator=collator, step=step, world_size=1,
                                        is_main=True, followup=False,
                                        reference_pass=lambda label, refs=None: (2, tqdm(disable=True))))
        events.append(event)
        for s in event["shares_read"]:
            for source in shares[s]:
                latest[source.name] = mean_nll_gradient(model, params, source.features, collator)
        basis = span.basis
        assert sorted(basis.names) == sorted(latest) and basis.rank() == 6
        for rows in basis.directions:  # orthonormal rows, per tensor
            gram = rows.double() @ rows.double().T
            assert torch.allclose(gram, torch.eye(rows.shape[0], dtype=torch.float64), atol=1e-5)
        g = [torch.randn(p.shape, generator=gen) for p in params]
        project_(g, basis, "project")
        for name, r in latest.items():
            for gt, rt in zip(g, r):  # per tensor (tensor granularity)
                if float(rt.norm()) > 0:
                    assert abs(cosine([gt], [rt])) < 1e-4, (step, name, cosine([gt], [rt]))
        if step:  # what the check can see: the share not read now has turned since its latest read
            unread = [src for s, share in enumerate(shares) if s not in event["shares_read"] for src in share]
            now = [mean_nll_gradient(model, params, src.features, collator) for src in unread]
            assert max(abs(cosine([gt], [rt])) for r in now for gt, rt in zip(g, r)) > 1e-3
    assert [e["shares_read"] for e in events] == [[0, 1], [0], [1], [0]]
    assert [e["rotation_turn"] for e in events] == [0, 1, 2, 3]
    assert events[1]["tokens_read"] + events[2]["tokens_read"] == events[0]["tokens_read"]
    assert sorted(k for k in events[1] if k.startswith("tokens/")) == [f"tokens/{n}@0" for n in sorted(REFS)]
    # the basis' norms are those of each share's gradient as it was read (kept ones re-formed from the rows)
    for name, norm in zip(span.basis.names, span.basis.ref_norms.tolist()):
        true = sum(float(t.double().square().sum()) for t in latest[name]) ** 0.5
        assert abs(norm - true) <= 1e-4 * true, (name, norm, true)
    state = span.state_dict()
    assert state["turn"] == 3 and span.identity()["reference_rotation"] == 2


BAD = {
    "keep_previous": ({"ogpsa_keep_previous": True}, "ogpsa_keep_previous: not used with ogpsa_reference_rotation > 1"),
    "zero": ({"ogpsa_reference_rotation": 0}, "ogpsa_reference_rotation: must be >= 1, got 0"),
    "too_few": ({"ogpsa_reference_rotation": 3, "ogpsa_directions_per_set": 2},
                "ogpsa_reference_rotation: 3 shares x 2 directions per set need at least as many samples per set, "
                "but ogpsa_reference_samples is 4"),
    "null_space": ({"ogpsa_method": "null_space"}, "ogpsa_reference_rotation: not used by ogpsa_method=null_space"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rotation_settings_are_named(case):
    from ogpsa.plugin.settings import OGPSAConfigError, split_ogpsa_args

    keys, message = BAD[case]
    with pytest.raises(OGPSAConfigError, match=re.escape(message)) as err:
        split_ogpsa_args({**rotation_keys(), **keys}, "x.yaml: ")
    assert str(err.value).startswith("x.yaml: ") and "\n" not in str(err.value)


def test_rotation_with_directions_per_set_splits_each_share():
    from ogpsa.plugin.methods.gradient_span.rotation import share_of, shares
    from ogpsa.plugin.reference import ReferenceSet

    refs = [ReferenceSet(name, [{"input_ids": [i]} for i in range(8)]) for name in ("a", "b")]
    split = shares(refs, 2, 2)
    assert [[g.name for g in share] for share in split] == [["a@0#0", "a@0#1", "b@0#0", "b@0#1"],
                                                             ["a@1#0", "a@1#1", "b@1#0", "b@1#1"]]
    assert [f["input_ids"][0] for f in split[1][1].features] == [3, 7]  # share 1 = 1, 3, 5, 7; its group 1
    assert share_of("a@1#0") == 1 and share_of("x@y@0") == 0
    assert shares(refs, 1, 1) == [refs]


# ---- through `llamafactory-cli train` ------------------------------------------------------------------

# AdamW with the update target, a rebuild every step, checkpoints every 2 steps: builds at 0 (both shares),
# 1 (share 0), 2 (share 1), 3 (share 0). checkpoint-2 holds the basis built at step 1: a resume there must
# read share 1 at step 2 and keep share 0's gradient of step 1 and share 1's of step 0.
FOUR = {"optim": "adamw_torch", "learning_rate": 2e-3, "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
        "overwrite_output_dir": False, **rotation_keys()}


def test_rotation_through_the_cli_and_a_resume_mid_rotation(tiny, tmp_path, trained):
    """The rebuild log: shares in turn, two rotated rebuilds read the tokens of one full one, rank 6, the
    logged cosines with every share's gradient ~0. Resumed at checkpoint-2 (position and stored shares in
    it), the run reads share 1 at step 2 and share 0 at step 3 and ends at the uninterrupted run's weights."""
    whole = trained(**FOUR)
    log = ogpsa_log(whole)
    rebuilds = [r for r in log if r.get("event") == "rebuild"]
    assert [(r["step"], r["shares_read"], r["rank"]) for r in rebuilds] == [
        (0, [0, 1], 6), (1, [0], 6), (2, [1], 6), (3, [0], 6)]
    assert rebuilds[1]["tokens_read"] + rebuilds[2]["tokens_read"] == rebuilds[0]["tokens_read"] > 0
    for name in REFS:  # per set too: its two shares' tokens add up to the set's
        assert rebuilds[1][f"tokens/{name}@0"] + rebuilds[2][f"tokens/{name}@1"] == (
            rebuilds[0][f"tokens/{name}@0"] + rebuilds[0][f"tokens/{name}@1"])
    steps = [r for r in log if "removed_fraction" in r]
    assert len(steps) == 4
    for r in steps:
        cos = {k: v for k, v in r.items() if k.startswith("cos_after/")}
        assert sorted(cos) == sorted(f"cos_after/{n}@{s}" for n in REFS for s in (0, 1))
        assert max(abs(v) for v in cos.values()) < 1e-4, cos

    saved = torch.load(whole / "checkpoint-2" / "ogpsa" / "replicated.pt", weights_only=True)
    assert saved["built_at_step"] == 1 and saved["turn"] == 1 and saved["reference_rotation"] == 2
    assert sorted(saved["basis"]["names"]) == sorted(f"{n}@{s}" for n in REFS for s in (0, 1))  # the stored shares

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    for name in ("model.safetensors", "trainer_state.json", "train_results.json", "all_results.json"):
        (resumed / name).unlink(missing_ok=True)
    cfg = base_config(tiny, resumed, **FOUR)
    proc = run_cli({**cfg, "resume_from_checkpoint": str(resumed / "checkpoint-2")}, tmp_path / "run_resume")
    assert "resumed the subspace built at step 1" in proc.stderr + proc.stdout
    gap = max_diff(load_state(whole), load_state(resumed))
    print(f"resumed mid-rotation vs uninterrupted: {gap:.2e}")
    assert gap < 1e-6
    again = [r for r in ogpsa_log(resumed) if r.get("event") == "rebuild"]
    assert [(r["step"], r["shares_read"]) for r in again] == [(0, [0, 1]), (1, [0]), (2, [1]), (3, [0])]


@pytest.mark.multiprocess
def test_two_processes_match_one(tiny, tmp_path):
    """DDP (gloo), the same global batch: each rotated rebuild's share is split over the ranks and its
    gradient summed, so 2 processes read the same tokens, keep the same basis and train the same weights."""
    rebuilds, _ = one_and_two_processes(tiny, tmp_path, 3, rotation_keys())
    one, two = rebuilds[1], rebuilds[2]
    assert [r["shares_read"] for r in two] == [[0, 1], [0], [1]]
    assert all(r["world_size"] == 2 and r["rank_spread"] == 0.0 for r in two)
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k.startswith("tokens")} == {k: v for k, v in b.items()
                                                                          if k.startswith("tokens")}


@pytest.mark.multiprocess
def test_zero2_rotates_its_partitions_as_ddp_rotates_whole_tensors(tiny, tmp_path):
    """ZeRO-2 on 2 processes: each rank re-forms the kept shares' gradients on its own partition (the
    coordinates are replicated), so it trains the weights 2-process DDP trains, reading the same shares."""
    import json

    config = tmp_path / "ds_z2.json"
    config.write_text(json.dumps(deepspeed_config(2)))
    states, logs = {}, {}
    for engine in ("ddp", "zero2"):
        out = tmp_path / engine
        cfg = base_config(tiny, out, per_device_train_batch_size=4, max_samples=8, max_steps=3, optim="sgd",
                          learning_rate=0.05, max_grad_norm=0.0, ddp_backend="gloo", **rotation_keys())
        if engine == "zero2":
            cfg["deepspeed"] = str(config)
        run_cli(cfg, tmp_path / f"run_{engine}", env=TORCHRUN)
        states[engine], logs[engine] = load_state(out), ogpsa_log(out)
    keys = set(states["ddp"]) & set(states["zero2"])  # ZeRO-2 also saves the tied lm_head
    update = max(float((states["ddp"][k] - load_state(tiny["model"])[k]).abs().max()) for k in keys)
    gap = max(float((states["ddp"][k].float() - states["zero2"][k].float()).abs().max()) for k in keys)
    ulp = torch.finfo(torch.float32).eps * max(float(states["ddp"][k].abs().max()) for k in keys)
    print(f"ZeRO-2 vs DDP under rotation: {gap:.2e} (update {update:.2e}, ulp {ulp:.1e})")
    assert gap <= max(1e-5 * update, 8 * ulp)
    zero = [r for r in logs["zero2"] if r.get("event") == "rebuild"]
    assert [(r["engine"], r["shares_read"], r["rank"]) for r in zero] == [
        ("zero2", [0, 1], 6), ("zero2", [0], 6), ("zero2", [1], 6)]
