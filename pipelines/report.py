"""`ogpsa report DIR [DIR ...] [--out PREFIX]`: markdown table and Pareto plot of evaluated runs.

Each DIR is one run:
  * a pipeline output folder with `pipeline.json` = {"recipe": ..., "stages": [{"name", "stage",
    "output", "status", "eval": {<evaluate_model result>}}], "eval_base": {...} (optional)}; stages
    without an `eval` block take theirs from `DIR/eval.json` written by `ogpsa eval DIR` (matched by
    stage name), or
  * a folder holding an `eval.json` from `ogpsa eval` (one model, or the per-stage form of a
    pipeline folder).

Writes PREFIX.md (one row per run and stage: refusal rate on harmful prompts, over-refusal on
benign prompts, each capability NLL, their mean, HHH accuracy by summed and by per-token
log-likelihood) and PREFIX.png: safety (refusal rate on harmful prompts, higher is safer) on the
y axis against capability (mean answer NLL across sources, lower is better, so better points sit
up and to the left) on the x axis, one line per run through its stages in order (the Pareto view:
plain and OGPSA runs of one recipe side by side).
Both files are written atomically (temp file + rename); the table is printed too.
The run label is the folder name (with its parent when two folders share a name) plus the
recipe name when pipeline.json gives one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from ..plugin.files import write_atomic

from .eval_config import EvalError
from .scoring import flat_metrics

COLUMNS = [("refusal_harmful", "refusal (harmful) ↑"), ("refusal_benign", "over-refusal (benign) ↓")]
TAIL = [("nll_mean", "NLL mean ↓"), ("hhh_acc", "HHH acc ↑"), ("hhh_acc_norm", "HHH acc (norm) ↑")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read {path}: {e}") from e


def _metrics(ev: dict | None) -> dict | None:
    """The flat metrics of an evaluate_model result (recomputed when the block lacks them)."""
    if not ev:
        return None
    return ev["metrics"] if "metrics" in ev else flat_metrics(ev)


def _recipe_name(recipe) -> str | None:
    if isinstance(recipe, dict):
        return recipe.get("name") or recipe.get("path")
    return Path(str(recipe)).stem if recipe else None


def load_run(run_dir: Path) -> dict:
    """{"dir", "recipe", "points": [(stage name, metrics)]} of one run folder."""
    pipe, ev_path = run_dir / "pipeline.json", run_dir / "eval.json"
    if not run_dir.is_dir():
        raise EvalError(f"run folder not found: {run_dir}")
    if not pipe.is_file() and not ev_path.is_file():
        raise EvalError(f"{run_dir}: neither pipeline.json nor eval.json found")
    spec = _read_json(pipe) if pipe.is_file() else {}
    ev = _read_json(ev_path) if ev_path.is_file() else {}
    if "model" in ev and "stages" not in ev:  # one model evaluated
        return {"dir": run_dir, "recipe": _recipe_name(spec.get("recipe")), "points": [("model", _metrics(ev))]}
    from_eval = {s.get("name"): s.get("eval") for s in ev.get("stages", [])}
    points = []
    base = spec.get("eval_base") or ev.get("eval_base")
    if base:
        points.append(("base", _metrics(base)))
    stages = spec.get("stages") or ev.get("stages") or []
    for i, st in enumerate(stages):
        name = st.get("name", f"stage{i}")
        block = st.get("eval") or from_eval.get(name)
        if block:
            points.append((name, _metrics(block)))
    if not points:
        raise EvalError(f"{run_dir}: no evaluated stage (no `eval` blocks in pipeline.json, no eval.json)")
    return {"dir": run_dir, "recipe": _recipe_name(spec.get("recipe")), "points": points}


def label_runs(runs: list[dict]) -> None:
    """Set run["label"]: folder name (parent/name on clashes) plus the recipe name if any."""
    names = [r["dir"].resolve().name for r in runs]
    for run, name in zip(runs, names):
        label = f"{run['dir'].resolve().parent.name}/{name}" if names.count(name) > 1 else name
        run["label"] = f"{label} ({run['recipe']})" if run["recipe"] and run["recipe"] != name else label


def _cell(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown_table(runs: list[dict]) -> str:
    """One row per (run, stage); columns: refusal rates, capability NLLs, NLL mean, HHH accuracy, judge rates
    and lm-eval metrics."""
    nll_keys = sorted({k for r in runs for _, m in r["points"] for k in (m or {}) if k.startswith("nll/")})
    lm_keys = sorted({k for r in runs for _, m in r["points"] for k in (m or {}) if k.startswith(("judge/", "lm_eval/"))})
    cols = COLUMNS + [(k, f"{k} ↓") for k in nll_keys] + TAIL + [(k, k) for k in lm_keys]
    lines = ["| run | stage | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in runs:
        for stage, m in r["points"]:
            lines.append(f"| {r['label']} | {stage} | " + " | ".join(_cell((m or {}).get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def pareto_png(runs: list[dict], title: str = "OGPSA: safety vs capability") -> bytes:
    """PNG bytes of refusal rate (harmful, y) against mean NLL (x, lower is better), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for r in runs:
        pts = [(s, m) for s, m in r["points"] if m and m.get("nll_mean") is not None and m.get("refusal_harmful") is not None]
        if not pts:
            continue
        xs, ys = [m["nll_mean"] for _, m in pts], [m["refusal_harmful"] for _, m in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=r["label"])
        for (stage, _), x, y in zip(pts, xs, ys):
            ax.annotate(stage, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    if not ax.lines:
        ax.text(0.5, 0.5, "no run has both refusal rate and NLL", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("capability: mean answer NLL across sources (nats/token, lower is better ←)")
    ax.set_ylabel("safety: refusal rate on harmful prompts (higher is safer ↑)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def make_report(dirs: list[str], out_prefix: str) -> tuple[Path, Path, str]:
    """Write PREFIX.md and PREFIX.png for the run folders; return (md path, png path, table)."""
    runs = [load_run(Path(d).expanduser()) for d in dirs]
    label_runs(runs)
    table = markdown_table(runs)
    md = write_atomic(Path(f"{out_prefix}.md"), "# OGPSA report\n\n" + table + f"\n![safety vs capability]({Path(out_prefix).name}.png)\n")
    png = write_atomic(Path(f"{out_prefix}.png"), pareto_png(runs))
    return md, png, table


def main(argv: list[str] | None = None) -> int:
    """`ogpsa report` entry point; 0 on success, 2 on bad input."""
    p = argparse.ArgumentParser(prog="ogpsa report", description="Markdown table and Pareto plot of evaluated runs.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="pipeline output folders (pipeline.json) or folders with eval.json")
    p.add_argument("--out", default="ogpsa_report", help="output prefix: writes PREFIX.md and PREFIX.png (default ogpsa_report)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        md, png, table = make_report(args.dirs, args.out)
    except EvalError as e:
        print(f"ogpsa report: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"[ogpsa report] wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
