"""Weight averaging, the baseline a projection method has to beat: models on the straight line
between a run's starting model and one of its stages' models, evaluated like a stage.

    theta(w) = (1 - w) * theta_start + w * theta_stage        (w = 0: the start, w = 1: the stage)

Lin et al. (EMNLP 2024, "Mitigating the Alignment Tax of RLHF", arXiv 2309.06256) report this
interpolation as the best alignment-forgetting trade-off among the methods they compared, at no
training cost. `ogpsa report --average 0.25,0.5,0.75` draws it as a curve beside the runs.

Cache, per run folder: `<run>/averages/<stage>_w<w>/` is the averaged model (written once, into a
temporary folder renamed into place, so a crash leaves nothing half-written) with `average.json`
naming what it was built from, and `eval.json` its evaluation. Both are reused while the stage's
training identity (the runner's hash), the starting model, the weight and the evaluation settings
(the stage's own, with the content of the files they read) are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plugin.files import atomic_dir, write_json_atomic

from .eval_config import EvalConfig, EvalError
from .identity import eval_identity

AVERAGES = "averages"
MARKER = "average.json"
LOG = "average.log"  # the loaders' and evaluations' output, quiet mode


def parse_weights(text: str) -> list[float]:
    """'0.25,0.5,0.75' -> [0.25, 0.5, 0.75]; EvalError naming the value unless every one is in (0, 1)."""
    weights = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            w = float(part)
        except ValueError:
            raise EvalError(f"--average: {part!r} is not a number (give weights in (0, 1), e.g. 0.25,0.5,0.75)") from None
        if not 0.0 < w < 1.0:
            raise EvalError(f"--average: {part} is outside (0, 1) (0 is the starting model, 1 the stage's model)")
        weights.append(w)
    return sorted(set(weights))


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def average_model(start: str, end: str, weight: float, out: Path, identity: dict) -> Path:
    """Write (1 - weight) * start + weight * end to `out` (atomically), in end's dtype; return `out`.
    Averaged in float32, then cast. EvalError when the two models' parameters differ in name or shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(end, dtype="auto")
    base = AutoModelForCausalLM.from_pretrained(start, dtype="auto")
    ours, theirs = dict(model.named_parameters()), dict(base.named_parameters())
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise EvalError(f"--average: {end} and its starting model {start} have different parameters; cannot average them")
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(((1.0 - weight) * theirs[name].float() + weight * p.float()).to(p.dtype))
    del base
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(end).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def plan_average(run_dir: Path, spec: dict, from_eval: dict, stage: str | None = None) -> dict:
    """What the curve of one run averages: {"dir", "start", "end", "record", "settings"}; EvalError (one
    line) for a run that cannot have one. Reads nothing but pipeline.json and eval.json."""
    if not spec:
        raise EvalError(f"--average: {run_dir}: no pipeline.json (the starting model and stage models come from it)")
    stages = [s for s in spec.get("stages") or [] if s.get("status", "done") == "done" and s.get("model")]
    if not stages:
        raise EvalError(f"--average: {run_dir}: no finished stage with a model folder in pipeline.json")
    record = stages[-1] if stage is None else next((s for s in stages if s.get("name") == stage), None)
    if record is None:
        raise EvalError(f"--average-stage: {run_dir}: no finished stage named {stage!r}")
    start = (spec.get("stages") or [{}])[0].get("start_model")
    end = Path(record["model"])
    if not start:
        raise EvalError(f"--average: {run_dir}: pipeline.json does not name the run's starting model (stages[0].start_model)")
    if _is_adapter(end):
        raise EvalError(f"--average: {end} is a LoRA adapter; weight averaging needs full weights (the runner's merged folder)")
    block = record.get("eval") or from_eval.get(record.get("name"))
    if not block or not block.get("settings"):
        raise EvalError(f"--average: {run_dir}: stage {record.get('name')!r} has no evaluation to take the settings from "
                        "(evaluate the run first: an eval: block in the recipe, or `ogpsa eval DIR`)")
    EvalConfig.from_dict(block["settings"])
    return {"dir": Path(run_dir), "start": str(start), "end": str(end), "record": record, "settings": block["settings"]}


def average_curve(plan: dict, weights: list[float], verbose: bool = False) -> list[tuple[str, dict]]:
    """[(label "<w>×<stage>", evaluate_model result)] for each weight of a `plan_average` plan; builds
    and evaluates only what the cache lacks. Quiet (the default): the loaders' and the evaluation's
    output goes to `<run>/averages/average.log` under one progress bar per model."""
    return [(f"{w:g}×{plan['record']['name']}", averaged_eval(plan, w, verbose)) for w in weights]


def averaged_eval(plan: dict, w: float, verbose: bool = False) -> dict:
    """The evaluation of (1 - w) start + w stage, from the cache or built and evaluated now."""
    from .console import Console
    from .scoring import evaluate_model

    record, settings = plan["record"], plan["settings"]
    identity = {"start": plan["start"], "end": plan["end"], "end_hash": record.get("hash"), "weight": w}
    folder = plan["dir"] / AVERAGES / f"{record['name']}_w{w:g}"
    console = Console(verbose, prefix="[ogpsa report]")
    log = str(plan["dir"] / AVERAGES / LOG)
    ev_id = eval_identity(settings, json.dumps(identity, sort_keys=True))
    cached = _read(folder / "eval.json")
    built = _read(folder / MARKER) == identity and (folder / "config.json").is_file()
    if built and cached.get("eval_hash") == ev_id:
        return cached["eval"]
    (plan["dir"] / AVERAGES).mkdir(parents=True, exist_ok=True)
    if not built:
        console.say(f"averaging {w:g} x {plan['end']} + {1 - w:g} x {plan['start']} -> {folder}")
        with console.captured(log, f"average {w:g}×{record['name']}"):
            average_model(plan["start"], plan["end"], w, folder, identity)
    console.say(f"evaluating {folder}")
    with console.captured(log, f"eval {w:g}×{record['name']}"):
        cached = {"eval": evaluate_model(folder, EvalConfig.from_dict(settings)), "eval_hash": ev_id}
    write_json_atomic(folder / "eval.json", cached)
    return cached["eval"]


def calibrate(plan: dict, matched, run_eval: dict, verbose: bool = False, step: float = 0.1) -> tuple[float | None, dict | None]:
    """The largest pull-back toward the start whose model is still at plain's refusal: w goes down from
    1 - step in steps of `step` while `matched(evaluation)` holds and stops at the first that fails.
    Returns (w, its evaluation): w = 1 (the run itself) when 1 - step already fails, (None, None) when
    the run itself is not matched. Each tried weight is built and evaluated once (cached)."""
    if not matched(run_eval):
        return None, None
    best, best_eval = 1.0, run_eval
    for k in range(1, round(1 / step)):
        w = round(1.0 - k * step, 6)
        ev = averaged_eval(plan, w, verbose)
        if not matched(ev):
            break
        best, best_eval = w, ev
    return best, best_eval
