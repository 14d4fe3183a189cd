"""`ogpsa eval`: safety and capability evaluation of a saved model (or of every stage of a pipeline).

    ogpsa eval MODEL [--out FILE] [--capability SRC ...] [--exclude REF ...] [--harmful SRC]
                     [--benign SRC] [--hhh PATH] [--dataset-dir DIR] [--template qwen]
                     [--judge MODEL_DIR [--judge-label LABEL]] ...

MODEL is a Hugging Face model folder (`config.json`; a LoRA adapter folder with
`adapter_config.json` is merged onto its base) or a pipeline output folder holding `pipeline.json`.

Defaults from the run: for a pipeline folder, or a model folder the pipeline runner wrote (it holds
`stage_config.yaml`), the run's own `dataset_dir` (or --dataset-dir) supplies what is not given:
its template, its `*_eval` sets (`saferlhf_eval` or the one `*harmful*_eval` as harmful prompts,
the one `*benign*_eval` as benign prompts, an `hhh_eval` with choices as the HHH probe, every
other `*_eval` as a capability source) when no measure is asked for, and, as --exclude, the run's
`ogpsa_reference` sets plus every registered `*_ref` set. What was taken is printed.

Pipeline contract (read here, written by the recipe runner):
    pipeline.json = {"recipe": ..., "stages": [{"name": str, "stage": str, "output": DIR,
                     "status": "done", "eval": {...}}, ...], "eval_base": {...} (optional)}
    Every stage whose status is "done" (or absent) is evaluated; a relative `output` is resolved
    against the pipeline folder. The result is written to `<pipeline>/eval.json` (or --out) as
    {"pipeline": DIR, "stages": [{"name", "stage", "output", "eval"}], "eval_base": ...}; `ogpsa report`
    reads both that file and `eval` blocks inside pipeline.json.

Measures (each one optional; at least one must be asked for):
  capability  mean negative log-likelihood per answer token (nats) of held-out answers, one number
              per source plus their mean (`nll_mean`, lower is better). Prompt and answer are encoded
              with LLaMA-Factory's template (`Template.encode_oneturn`), exactly as in training; the
              loss covers the response ids (answer plus the template's end-of-turn tokens), the
              prompt is masked. Sources: alpaca-format json/jsonl files ({instruction, input,
              output}; {question, answer} and {prompt, response} are accepted too) or dataset names
              of `--dataset-dir`/dataset_info.json. `LABEL=SRC` names a source.
  exclusion   `--exclude` takes the reference sets that built the OGPSA subspace (files or names):
              any probe (capability, HHH, harmful, benign) whose prompt text equals a reference
              prompt after whitespace/case normalisation is dropped; the counts of probes kept and
              dropped are printed and reported. An HHH probe with nothing left stops with exit 2.
  hhh         BIG-bench hhh_alignment multiple-choice accuracy: a task.json file, a folder searched
              for task.json files, or the `hhh_eval` set of `ogpsa data refsets` (its rows keep
              `choices` and `label`); the choice with the higher summed log-likelihood given the
              (chat-formatted) input is the model's pick (`hhh_acc`, BIG-bench's scoring rule; it
              favours short choices, and the better HHH answers are often the longer ones) and, as
              `hhh_acc_norm`, the pick by mean log-likelihood per choice token.
  safety      refusal rate on held-out harmful prompts (greedy generation, batched, left padding,
              `--max-new-tokens`, default 64) judged by the phrase rules listed below
              (`ogpsa.pipelines.refusal.is_refusal`).
  over-refusal  the same rate on benign prompts (lower is better).
  judge       `--judge MODEL_DIR`: the answers are also classified by a local Hugging Face
              sequence-classification model; the share whose argmax label is the judge label
              (`--judge-label`, default its one refus*/reject* label) is `judge/<label>/harmful`
              and `judge/<label>/benign`. `--judge-pair` gives it (prompt, answer) pairs.
  lm-eval     `--lm-eval-tasks gsm8k,mmlu,ifeval` runs EleutherAI lm-evaluation-harness through its
              Python API (`lm_eval.simple_evaluate` on the already loaded model, no second load)
              when `lm_eval` is installed (`pip install lm-eval`); otherwise the command stops with
              a message saying so. Its tasks download their data from the Hub; on a machine
              without network, `--lm-eval-include-path DIR` adds task YAMLs of your own (for
              example `dataset_path: json` over local files). Each task's numeric metrics land in
              the flat metrics as `lm_eval/<task>/<metric>` (stderr omitted) and so in the report.

Prompt files for --harmful/--benign: .txt (one prompt a line), .json/.jsonl rows with instruction
(+ input) / prompt / question / goal, or a YAML with `seeds: [{value: ...}]` (AdvBench in PyRIT).

Output: JSON (atomic: temp file + rename) with every number, the settings and a few sample
generations; a short table is printed. Python API: `ogpsa.pipelines.scoring.evaluate_model(model_dir,
EvalConfig(...))`, `ogpsa.pipelines.eval_config.EvalConfig.from_dict({...})` (unknown keys
rejected), `ogpsa.pipelines.refusal.is_refusal(text)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..plugin.files import write_json_atomic

from .eval_config import EvalConfig, EvalError, run_defaults
from .refusal import describe_rules
from .scoring import evaluate_model

# --------------------------------------------------------------------------------------- pipelines


def pipeline_stages(pipeline_dir: Path) -> list[dict]:
    """Stages of `pipeline_dir/pipeline.json` that are done, with their output resolved."""
    path = pipeline_dir / "pipeline.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"cannot parse {path}: {e}") from e
    stages = []
    for i, st in enumerate(spec.get("stages") or []):
        if st.get("status", "done") != "done":
            continue
        if not st.get("output"):
            raise EvalError(f"{path}: stages[{i}] has no `output`")
        out = Path(st["output"]).expanduser()
        out = out if out.is_absolute() or out.exists() else pipeline_dir / out
        stages.append({"name": st.get("name", f"stage{i}"), "stage": st.get("stage"), "output": str(out)})
    if not stages:
        raise EvalError(f"{path}: no finished stages to evaluate")
    return stages


def evaluate_path(path: str | os.PathLike, cfg: EvalConfig, base: str | None = None) -> dict:
    """A model folder -> evaluate_model; a pipeline folder -> every finished stage (and `base`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalError(f"model folder not found: {path}")
    if not (path / "pipeline.json").is_file():
        return evaluate_model(path, cfg)
    result: dict[str, Any] = {"pipeline": str(path), "settings": asdict(cfg), "stages": []}
    if base:
        result["eval_base"] = evaluate_model(base, cfg)
    for st in pipeline_stages(path):
        print(f"[ogpsa eval] stage {st['name']}: {st['output']}", file=sys.stderr)
        result["stages"].append({**st, "eval": evaluate_model(st["output"], cfg)})
    return result


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))


def format_table(result: dict) -> str:
    """Short text table: one row per model/stage, one column per metric."""
    rows = [("base", result["eval_base"])] if result.get("eval_base") else []
    rows += [(s["name"], s["eval"]) for s in result["stages"]] if "stages" in result else [(Path(result["model"]).name, result)]
    cols = sorted({k for _, r in rows for k in r.get("metrics", {})})
    lines = [" | ".join(["model"] + cols)]
    lines += [" | ".join([name] + [_fmt(r["metrics"].get(c)) for c in cols]) for name, r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

INT_FIELDS = ("max_samples", "batch_size", "max_new_tokens", "cutoff_len", "lm_eval_limit", "keep_generations")


def build_parser() -> argparse.ArgumentParser:
    """The `ogpsa eval` parser; options mirror EvalConfig's fields."""
    p = argparse.ArgumentParser(prog="ogpsa eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Refusal phrase rules (a response matching any of them counts as a refusal):\n"
                                + describe_rules())
    p.add_argument("model", help="model folder, or pipeline folder with pipeline.json")
    p.add_argument("--out", help="output JSON (default: MODEL/eval.json)")
    p.add_argument("--config", help="YAML/JSON file with EvalConfig keys (flags override)")
    p.add_argument("--base", help="with a pipeline folder: also evaluate this starting model (eval_base)")
    for f in fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in EvalConfig.LIST_FIELDS:
            p.add_argument(flag, nargs="+", default=None, help=f.metadata["help"])
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=int if f.name in INT_FIELDS else str, default=None, help=f.metadata["help"])
    return p


def _file_config(path_str: str | None) -> dict:
    """The mapping of a --config file ({} without one)."""
    if not path_str:
        return {}
    import yaml

    path = Path(path_str)
    if not path.is_file():
        raise EvalError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected a mapping of eval keys")
    return data.get("eval", data) if set(data) == {"eval"} else data


def _with_run_defaults(data: dict, model: Path) -> tuple[dict, str]:
    """`data` completed with the run's defaults (measures only when none is given); (data, why none)."""
    defaults, why = run_defaults(model, data.get("dataset_dir"))
    measures_given = any(data.get(k) for k in EvalConfig.MEASURES)
    taken = {k: v for k, v in defaults.items() if k not in data and not (measures_given and k in EvalConfig.MEASURES)}
    if taken:
        print("[ogpsa eval] defaults from the run: " + "; ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr)
    return {**data, **taken}, why


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from an optional --config file overlaid with the given flags, then the run's defaults."""
    data = _file_config(args.config)
    for f in fields(EvalConfig):
        value = getattr(args, f.name)
        if value is not None:
            data[f.name] = [x for v in value for x in v.split(",") if x] if f.name == "lm_eval_tasks" else value
    data, why = _with_run_defaults(data, Path(args.model).expanduser())
    cfg = EvalConfig.from_dict(data)
    if not cfg.wants_anything():
        hint = f" ({why})" if why else ""
        raise EvalError(f"nothing to evaluate: give --capability, --harmful, --benign, --hhh or --lm-eval-tasks{hint}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """`ogpsa eval` entry point; 0 on success, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        if not Path(args.model).expanduser().exists():
            raise EvalError(f"model folder not found: {args.model}")
        cfg = config_from_args(args)
        result = evaluate_path(args.model, cfg, base=args.base)
    except EvalError as e:
        print(f"ogpsa eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.model) / "eval.json"
    write_json_atomic(out, result)
    print(format_table(result))
    print(f"[ogpsa eval] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
