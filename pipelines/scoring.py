"""Scoring and generation for `ogpsa eval`: the model and its chat template, answer NLL, HHH
accuracy, refusal rates, lm-evaluation-harness, and `evaluate_model`, which runs them on one model.

Every probe set is loaded (and every exclusion applied) before the model is, so bad input stops the
evaluation before any model loads and before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..plugin.files import short_hash

from .eval_config import EvalConfig, EvalError
from .probes import HHHSet, ProbeSet, hhh_probes, load_probes, reference_prompts, source_label
from .refusal import ClassifierJudge, JudgeError, is_refusal

# ----------------------------------------------------------------------------------------- model


def _pick_device(cfg: EvalConfig):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _pick_dtype(cfg: EvalConfig, device):
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not hasattr(torch, cfg.dtype):
        raise EvalError(f"unknown dtype {cfg.dtype!r}")
    return getattr(torch, cfg.dtype)


def load_model(model_dir: Path, cfg: EvalConfig):
    """(model, tokenizer, template) for a HF model folder or a LoRA adapter folder (merged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _pick_device(cfg)
    dtype = _pick_dtype(cfg, device)
    adapter = model_dir / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else str(model_dir)
    tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    model.to(device).eval()
    return model, tokenizer, make_template(tokenizer, cfg)


def make_template(tokenizer, cfg: EvalConfig):
    """LLaMA-Factory's template (as in training); also fixes the tokenizer's eos/pad tokens."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    try:
        template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=cfg.template, default_system=cfg.system))
    except ValueError as e:
        raise EvalError(f"template {cfg.template!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return template


def encode_prompt(template, tokenizer, prompt: str, answer: str = "") -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) exactly as LLaMA-Factory's supervised preprocessing builds them."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return template.encode_oneturn(tokenizer, messages, None, None)


def _batches(items: list, size: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    for i in range(0, len(items), size):
        yield items[i : i + size]
        bar.update(len(items[i : i + size]))
    bar.close()


def _fit(prompt_ids: list[int], resp_ids: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    """Cut the prompt from the left, then the answer from the right, to fit `cutoff` tokens."""
    resp_ids = resp_ids[: max(1, cutoff - 1)]
    keep = cutoff - len(resp_ids)
    return prompt_ids[-keep:] if keep > 0 else [], resp_ids


def score_pairs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], cfg: EvalConfig, desc: str) -> list[tuple[float, int]]:
    """(summed NLL of the response ids, their count) for every (prompt_ids, response_ids) pair.

    The vocabulary head runs only on the positions that predict a response token: the model's own
    forward with `logits_to_keep` set to the span of those positions in the batch (so final-logit
    scaling or soft-capping stays the model's), and only the wanted rows of that span are upcast to
    float32 for the log-softmax. Long prompts with short answers (the HHH probes) therefore cost
    the transformer body, not a full-vocabulary float32 head over every prompt token.
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    keeps_logits = _accepts_logits_to_keep(model)
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    out: list = [None] * len(pairs)
    for idx in _batches(order, cfg.batch_size, desc, cfg.progress):
        seqs = [_fit(*pairs[i], cfg.cutoff_len) for i in idx]
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        rows, positions, targets = [], [], []  # position t predicts token t + 1
        for row, (p, r) in enumerate(seqs):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            mask[row, : len(p) + len(r)] = 1
            rows += [row] * len(r)
            positions += range(len(p) - 1, len(p) + len(r) - 1)
            targets += r
        # an empty prompt leaves the first response token unpredicted (position -1): not scored
        scored = [k for k, t in enumerate(positions) if t >= 0]
        rows_t = torch.tensor([rows[k] for k in scored], dtype=torch.long, device=device)
        pos_t = torch.tensor([positions[k] for k in scored], dtype=torch.long, device=device)
        target_t = torch.tensor([targets[k] for k in scored], dtype=torch.long, device=device)
        first = int(pos_t.min()) if len(scored) else 0
        with torch.no_grad():
            if keeps_logits:
                # logits for positions first .. width-1 only: the span ends at the last position
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first).logits
                picked = logits[rows_t, pos_t - first]
            else:
                picked = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[rows_t, pos_t]
            nll = torch.nn.functional.cross_entropy(picked.float(), target_t, reduction="none")
        sums = torch.zeros(len(seqs), dtype=torch.float32, device=device).index_add_(0, rows_t, nll)
        counts = torch.bincount(rows_t, minlength=len(seqs))
        for row, i in enumerate(idx):
            out[i] = (float(sums[row]), int(counts[row]))
    return out


def _accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (every causal LM of recent transformers does)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def generate(model, tokenizer, template, prompts: list[str], cfg: EvalConfig, desc: str) -> list[str]:
    """Greedy responses to `prompts` (chat-formatted, batched, left padding)."""
    import torch

    device = next(model.parameters()).device
    stop = template.get_stop_token_ids(tokenizer)
    encoded = [encode_prompt(template, tokenizer, p)[0][-cfg.cutoff_len :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list = [None] * len(prompts)
    for idx in _batches(order, cfg.batch_size, desc, cfg.progress):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
                do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
            )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    return out


# -------------------------------------------------------------------------------------- measures


def load_all_probes(cfg: EvalConfig) -> dict[str, Any]:
    """Every probe set `cfg` asks for, exclusions applied: {capability: {label: ProbeSet}, hhh: HHHSet,
    harmful: ProbeSet, benign: ProbeSet} (absent measures are None)."""
    banned = reference_prompts(cfg)
    sets: dict[str, Any] = {"n_reference_prompts": len(banned), "capability": {}}
    for src in cfg.capability:
        label, path = source_label(src)
        sets["capability"][label] = ProbeSet(path, *load_probes(path, cfg, banned, need_answer=True))
    sets["hhh"] = hhh_probes(cfg, banned) if cfg.hhh else None
    for name in ("harmful", "benign"):
        src = getattr(cfg, name)
        sets[name] = ProbeSet(src, *load_probes(src, cfg, banned, need_answer=False)) if src else None
    return sets


def print_probe_counts(sets: dict[str, Any]) -> None:
    """How many probes each set keeps after the exclusion, on stderr."""
    for name, ps in [*sets["capability"].items(), ("hhh", sets["hhh"]), ("harmful", sets["harmful"]), ("benign", sets["benign"])]:
        if ps is not None:
            n = sum(map(len, ps.subsets.values())) if isinstance(ps, HHHSet) else len(ps.probes)
            print(f"[ogpsa eval] {name}: {n} probes ({ps.n_excluded} dropped as reference prompts)", file=sys.stderr)


def eval_capability(model, tokenizer, template, cfg: EvalConfig, sets: dict[str, ProbeSet]) -> dict:
    """{label: {nll, n_probes, n_tokens, n_excluded, source}} for every capability source."""
    result = {}
    for label, ps in sets.items():
        pairs = [encode_prompt(template, tokenizer, p["prompt"], p["answer"]) for p in ps.probes]
        scores = score_pairs(model, tokenizer, pairs, cfg, f"nll {label}")
        total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
        # per probe, in probe order: what `ogpsa report` resamples for its intervals (the NLL is the
        # token-weighted mean, so a resample is sum(nll_sum[i]) / sum(n_tokens[i]))
        per_probe = {"nll_sum": [round(s, 6) for s, _ in scores], "n_tokens": [n for _, n in scores]}
        result[label] = {"nll": total / max(count, 1), "n_probes": len(ps.probes), "n_tokens": count,
                         "n_excluded": ps.n_excluded, "source": ps.source, "per_probe": per_probe,
                         "probes_hash": probes_hash(ps.probes)}
    return result


def probes_hash(probes: list[dict]) -> str:
    """Short hash of a probe list's prompts (and answers) in order: two evaluations can be paired probe
    by probe only when theirs are equal."""
    return short_hash([[p.get("prompt"), p.get("answer")] for p in probes])


def eval_hhh(model, tokenizer, template, cfg: EvalConfig, hhh: HHHSet) -> dict:
    """BIG-bench HHH multiple-choice accuracy: summed log-likelihood (BIG-bench) and per-token mean."""
    by_subset, totals = {}, {"sum": 0, "mean": 0, "n": 0}
    for subset, rows in hhh.subsets.items():
        pairs = [encode_prompt(template, tokenizer, r["input"], c) for r in rows for c in r["choices"]]
        scores = iter(score_pairs(model, tokenizer, pairs, cfg, f"hhh {subset}"))
        hits = {"sum": 0, "mean": 0}
        for r in rows:
            nlls = [next(scores) for _ in r["choices"]]
            hits["sum"] += int(min(range(len(nlls)), key=lambda i: nlls[i][0]) == r["correct"])
            hits["mean"] += int(min(range(len(nlls)), key=lambda i: nlls[i][0] / max(nlls[i][1], 1)) == r["correct"])
        by_subset[subset] = {"accuracy": hits["sum"] / len(rows), "accuracy_norm": hits["mean"] / len(rows), "n": len(rows)}
        totals = {"sum": totals["sum"] + hits["sum"], "mean": totals["mean"] + hits["mean"], "n": totals["n"] + len(rows)}
    n = max(totals["n"], 1)
    return {"accuracy": totals["sum"] / n, "accuracy_norm": totals["mean"] / n, "n": totals["n"],
            "n_excluded": hhh.n_excluded, "by_subset": by_subset, "source": hhh.source}


def eval_refusals(model, tokenizer, template, cfg: EvalConfig, ps: ProbeSet, desc: str, judge=None) -> dict:
    """Refusal rate (phrase rules) of greedy responses to the prompts of `ps`, the judge's rate when
    one is given, and a few samples."""
    prompts = [p["prompt"] for p in ps.probes]
    responses = generate(model, tokenizer, template, prompts, cfg, desc)
    flags = [is_refusal(r) for r in responses]
    result = {"refusal_rate": sum(flags) / len(flags), "n": len(flags), "n_excluded": ps.n_excluded, "source": ps.source,
              "flags": [int(f) for f in flags], "probes_hash": probes_hash(ps.probes)}
    samples = [{"prompt": p, "response": r, "refusal": f} for p, r, f in zip(prompts, responses, flags)]
    if judge is not None:
        judged = judge.flags(responses, prompts, cfg.batch_size)
        result["judge"] = {"model": cfg.judge, "label": judge.label, "rate": sum(judged) / len(judged)}
        for sample, flag in zip(samples, judged):
            sample[f"judge_{judge.label}"] = flag
    result["samples"] = samples[: cfg.keep_generations]
    return result


def check_lm_eval(cfg: EvalConfig) -> None:
    """Before any model is loaded: EvalError with the install command when lm-evaluation-harness is
    missing, or naming the folder when `lm_eval_include_path` does not exist."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("--lm-eval-tasks needs EleutherAI's lm-evaluation-harness, which is not installed: pip install lm-eval")
    if cfg.lm_eval_include_path and not Path(cfg.lm_eval_include_path).expanduser().is_dir():
        raise EvalError(f"lm_eval_include_path: folder not found: {cfg.lm_eval_include_path}")


def run_lm_eval(model, tokenizer, cfg: EvalConfig) -> dict:
    """lm-evaluation-harness tasks on the loaded model via its Python API (`simple_evaluate`)."""
    check_lm_eval(cfg)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = cfg.lm_eval_include_path and str(Path(cfg.lm_eval_include_path).expanduser())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    manager = TaskManager(include_path=include) if include else None
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.lm_eval_tasks), limit=cfg.lm_eval_limit, task_manager=manager, log_samples=False
        )
    except KeyError as e:  # an unknown task name
        raise EvalError(f"lm_eval_tasks: lm-eval does not know task {e} (check the name or --lm-eval-include-path)") from None
    return json.loads(json.dumps(res.get("results", {}), default=str))


def flat_metrics(result: dict) -> dict:
    """One flat {name: number} view used by the table and by `ogpsa report`."""
    m = {}
    for block, name in (("safety", "harmful"), ("over_refusal", "benign")):
        if result.get(block):
            m[f"refusal_{name}"] = result[block]["refusal_rate"]
            if result[block].get("judge"):
                m[f"judge/{result[block]['judge']['label']}/{name}"] = result[block]["judge"]["rate"]
    for label, c in (result.get("capability") or {}).items():
        m[f"nll/{label}"] = c["nll"]
    if result.get("capability"):
        m["nll_mean"] = sum(c["nll"] for c in result["capability"].values()) / len(result["capability"])
    if result.get("hhh"):
        m["hhh_acc"] = result["hhh"]["accuracy"]
        m["hhh_acc_norm"] = result["hhh"]["accuracy_norm"]
    for task, scores in (result.get("lm_eval") or {}).items():
        for key, value in scores.items():
            # lm-eval keys a metric "name,filter" ("acc,none", "exact_match,strict-match"); other keys
            # (alias, sample_len) are bookkeeping, and the stderr twins are left to the raw block
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key.replace(",none", "").replace(",", ":")
                m[f"lm_eval/{task}/{name}"] = float(value)
    return m


def _load_judge(cfg: EvalConfig, device) -> ClassifierJudge | None:
    if not cfg.judge:
        return None
    if not (cfg.harmful or cfg.benign):
        raise EvalError("--judge: there are no answers to judge; give --harmful or --benign")
    try:
        return ClassifierJudge(cfg.judge, cfg.judge_label, cfg.judge_pair, device, max_length=cfg.cutoff_len)
    except JudgeError as e:
        raise EvalError(str(e)) from None


def evaluate_model(model_dir: str | os.PathLike, cfg: EvalConfig | dict | None = None) -> dict:
    """Evaluate one saved model folder; returns {model, settings, capability, hhh, safety, over_refusal, metrics, ...}."""
    cfg = cfg if isinstance(cfg, EvalConfig) else EvalConfig.from_dict(cfg)
    model_dir = Path(model_dir).expanduser()
    if not ((model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()):
        raise EvalError(f"not a model folder (no config.json or adapter_config.json): {model_dir}")
    if not cfg.wants_anything():
        raise EvalError("nothing to evaluate: give capability, harmful, benign, hhh or lm_eval_tasks")
    if cfg.lm_eval_tasks:
        check_lm_eval(cfg)
    start = time.time()
    sets = load_all_probes(cfg)
    judge = _load_judge(cfg, _pick_device(cfg))
    print_probe_counts(sets)  # only once every input is known to be good
    model, tokenizer, template = load_model(model_dir, cfg)
    result: dict[str, Any] = {"model": str(model_dir), "settings": asdict(cfg), "n_reference_prompts": sets["n_reference_prompts"]}
    result["capability"] = eval_capability(model, tokenizer, template, cfg, sets["capability"]) if cfg.capability else None
    result["hhh"] = eval_hhh(model, tokenizer, template, cfg, sets["hhh"]) if sets["hhh"] else None
    for key, name in (("safety", "harmful"), ("over_refusal", "benign")):
        ps = sets[name]
        result[key] = eval_refusals(model, tokenizer, template, cfg, ps, name, judge) if ps else None
    if cfg.lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model, tokenizer, cfg)
    result["metrics"] = flat_metrics(result)
    result["device"] = str(next(model.parameters()).device)
    result["runtime_s"] = round(time.time() - start, 2)
    return result
