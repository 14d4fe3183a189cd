"""`ogpsa report DIR [DIR ...] [--out PREFIX] [--average 0.25,0.5,0.75] [--plain DIR]`: markdown
table and Pareto plot of evaluated runs.

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
A second panel plots over-refusal (benign prompts, lower is better) against the same x axis.

Tax avoided: one run is plain (`--plain DIR`, or the first run whose stages are all plain `sft`/`dpo`).
For each capability source X and each stage, the tax a run avoids is 1 - (its rise) / (plain's
rise), where a rise is the stage's NLL on X minus the starting model's (`eval_base`), and plain's
is taken at the stage of the same name: 100% keeps the starting model's NLL, 0% is plain's, below
0 is worse than plain. It is only comparable at matched safety, so the `Δ refusal` column gives the
difference from plain's refusal rate in probes, and the report lists every row off by more than one.
Without a rise for plain on X (it is at or below the start) there is no tax to avoid: "–".

Weight averaging (`--average W,...`, runs with pipeline.json): the models (1 - w) x start + w x
stage for the run's last stage (`--average-stage NAME` for another), built once under
`<run>/averages/`, evaluated with the stage's own settings, cached (`ogpsa.pipelines.average`), and
drawn as a dashed curve from the starting model to the stage (`--average-run DIR`: only these runs).
The frontier column marks the points that no other point beats on both refusal and NLL mean.

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
    """The flat metrics of an evaluate_model result (recomputed when the block lacks them), plus the
    number of harmful probes (`n_harmful`) when the block has it."""
    if not ev:
        return None
    m = dict(ev["metrics"] if "metrics" in ev else flat_metrics(ev))
    if (ev.get("safety") or {}).get("n"):
        m["n_harmful"] = ev["safety"]["n"]
    return m


def _is_plain(stages: list[dict]) -> bool:
    kinds = [st.get("stage") for st in stages]
    return bool(kinds) and all(k and not str(k).startswith("ogpsa_") for k in kinds)


def _recipe_name(recipe) -> str | None:
    if isinstance(recipe, dict):
        return recipe.get("name") or recipe.get("path")
    return Path(str(recipe)).stem if recipe else None


def load_run(run_dir: Path) -> dict:
    """{"dir", "recipe", "plain", "points": [(stage name, metrics)], "average": []} of one run folder
    (with its pipeline.json and eval.json stage blocks, for `add_average`)."""
    pipe, ev_path = run_dir / "pipeline.json", run_dir / "eval.json"
    if not run_dir.is_dir():
        raise EvalError(f"run folder not found: {run_dir}")
    if not pipe.is_file() and not ev_path.is_file():
        raise EvalError(f"{run_dir}: neither pipeline.json nor eval.json found")
    spec = _read_json(pipe) if pipe.is_file() else {}
    ev = _read_json(ev_path) if ev_path.is_file() else {}
    if "model" in ev and "stages" not in ev:  # one model evaluated
        return {"dir": run_dir, "recipe": _recipe_name(spec.get("recipe")), "points": [("model", _metrics(ev))],
                "plain": False, "average": [], "spec": {}, "from_eval": {}}
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
    return {"dir": run_dir, "recipe": _recipe_name(spec.get("recipe")), "points": points,
            "plain": _is_plain(stages), "average": [], "spec": spec, "from_eval": from_eval}


def label_runs(runs: list[dict]) -> None:
    """Set run["label"]: folder name (parent/name on clashes) plus the recipe name if any."""
    names = [r["dir"].resolve().name for r in runs]
    for run, name in zip(runs, names):
        label = f"{run['dir'].resolve().parent.name}/{name}" if names.count(name) > 1 else name
        run["label"] = f"{label} ({run['recipe']})" if run["recipe"] and run["recipe"] != name else label


def _cell(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _rows(runs: list[dict]) -> list[dict]:
    """Every table row: {"run", "label", "stage", "m", "averaged"} (a run's stages, then its averaging curve)."""
    rows = []
    for r in runs:
        rows += [{"run": r, "label": r["label"], "stage": s, "m": m or {}, "averaged": None} for s, m in r["points"]]
        last = next((s for s, _ in reversed(r["points"]) if s != "base"), None)
        for label, m in r.get("average") or []:
            stage = label.split("×", 1)[1] if "×" in label else last
            rows.append({"run": r, "label": f"{r['label']} · average", "stage": label, "m": m or {}, "averaged": stage})
    return rows


def _base(run: dict | None) -> dict:
    return next((m or {} for s, m in (run or {}).get("points", []) if s == "base"), {})


def tax_avoided(rows: list[dict], plain: dict | None, nll_keys: list[str]) -> None:
    """Set row["tax"] = {nll key: 1 - rise / plain's rise or None} and row["d_refusal"] (probes) against
    the plain run's stage of the same name (for an averaged point, the stage it averages)."""
    if plain is None:
        return
    plain_base = _base(plain)
    plain_at = {s: m or {} for s, m in plain["points"]}
    for row in rows:
        if row["stage"] == "base":
            continue
        ref = plain_at.get(row["averaged"] or row["stage"])
        if ref is None:
            continue
        base = _base(row["run"]) or plain_base
        row["tax"] = {}
        for k in nll_keys:
            vals = (row["m"].get(k), base.get(k), ref.get(k), plain_base.get(k))
            if None in vals or vals[2] - vals[3] <= 0:
                row["tax"][k] = None  # plain did not raise it: no tax to avoid
            else:
                row["tax"][k] = 1.0 - (vals[0] - vals[1]) / (vals[2] - vals[3])
        n = row["m"].get("n_harmful") or ref.get("n_harmful")
        if n and row["m"].get("refusal_harmful") is not None and ref.get("refusal_harmful") is not None:
            row["d_refusal"] = round((row["m"]["refusal_harmful"] - ref["refusal_harmful"]) * n)


def frontier(rows: list[dict]) -> None:
    """Mark row["frontier"] on every stage or averaged point that no other one beats on both refusal
    (higher) and NLL mean (lower); the starting model is left out."""
    pts = [r for r in rows if r["stage"] != "base" and r["m"].get("refusal_harmful") is not None
           and r["m"].get("nll_mean") is not None]
    for r in pts:
        a = r["m"]
        r["frontier"] = not any(
            b["m"]["refusal_harmful"] >= a["refusal_harmful"] and b["m"]["nll_mean"] <= a["nll_mean"]
            and (b["m"]["refusal_harmful"] > a["refusal_harmful"] or b["m"]["nll_mean"] < a["nll_mean"])
            for b in pts if b is not r)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def markdown_table(runs: list[dict], plain: dict | None = None) -> str:
    """One row per (run, stage) and averaged point; columns: refusal rates, capability NLLs, NLL mean, HHH
    accuracy, judge rates, lm-eval metrics, then (with a plain run) the tax avoided per source and the
    refusal difference in probes, and the frontier mark; notes under the table."""
    rows = _rows(runs)
    every = [r["m"] for r in rows]
    nll_keys = sorted({k for m in every for k in m if k.startswith("nll/")})
    lm_keys = sorted({k for m in every for k in m if k.startswith(("judge/", "lm_eval/"))})
    cols = COLUMNS + [(k, f"{k} ↓") for k in nll_keys] + TAIL + [(k, k) for k in lm_keys]
    tax_avoided(rows, plain, nll_keys)
    frontier(rows)
    extra = ([f"tax avoided {k[4:]} ↑" for k in nll_keys] + ["Δ refusal vs plain (probes)"]) if plain else []
    extra.append("frontier")
    heads = [h for _, h in cols] + extra
    lines = ["| run | stage | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    notes = []
    for r in rows:
        cells = [_cell(r["m"].get(k)) for k, _ in cols]
        if plain:
            cells += [_pct((r.get("tax") or {}).get(k)) for k in nll_keys]
            d = r.get("d_refusal")
            cells.append("–" if d is None else f"{d:+d}")
            if d is not None and abs(d) > 1:
                notes.append(f"- {r['label']}, {r['stage']}: refusal differs from plain's by {d:+d} probes, "
                             "so its tax avoided is not at matched safety")
        cells.append("●" if r.get("frontier") else "")
        lines.append(f"| {r['label']} | {r['stage']} | " + " | ".join(cells) + " |")
    if plain:
        notes.insert(0, f"Tax avoided: 1 - rise / plain's rise per source, against plain = {plain['label']} "
                        "(the stage of the same name; rise = NLL minus the starting model's).")
        for k in nll_keys:
            pb, pl = _base(plain).get(k), next((m.get(k) for s, m in reversed(plain["points"]) if s != "base" and m), None)
            if pb is not None and pl is not None and pl - pb <= 0:
                notes.append(f"- plain did not raise {k} ({pl - pb:+.3f} at its last stage): no tax to avoid there")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def pareto_png(runs: list[dict], title: str = "OGPSA: safety vs capability") -> bytes:
    """PNG bytes: refusal rate (harmful, left panel) and over-refusal (benign, right panel) against mean
    NLL (x, lower is better); one line per run through its stages, its averaging curve dashed, the
    frontier's points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(runs)
    frontier(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    panels = [("refusal_harmful", "safety: refusal rate on harmful prompts (higher is safer ↑)"),
              ("refusal_benign", "over-refusal: refusal rate on benign prompts (lower is better ↓)")]
    for ax, (key, ylabel) in zip(axes, panels):
        for r in runs:
            color = None
            for points, style in ((r["points"], "-"), (_curve(r), "--")):
                pts = [(s, m) for s, m in points if m and m.get("nll_mean") is not None and m.get(key) is not None]
                if not pts:
                    continue
                xs, ys = [m["nll_mean"] for _, m in pts], [m[key] for _, m in pts]
                label = r["label"] if style == "-" else f"{r['label']} · average"
                (line,) = ax.plot(xs, ys, style, marker="o" if style == "-" else "s", color=color, label=label)
                color = line.get_color()
                for (stage, _), x, y in zip(pts, xs, ys):
                    ax.annotate(stage, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        ring = [r["m"] for r in rows if r.get("frontier") and r["m"].get(key) is not None]
        if ring:
            ax.scatter([m["nll_mean"] for m in ring], [m[key] for m in ring], s=180, facecolors="none", edgecolors="black",
                       linewidths=1.2, zorder=3, label="frontier (refusal vs NLL)")
        if not ax.lines:
            ax.text(0.5, 0.5, "no run has both this rate and NLL", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("capability: mean answer NLL across sources (nats/token, lower is better ←)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _curve(run: dict) -> list[tuple[str, dict]]:
    """A run's averaging curve from its starting model to the averaged stage (empty without one)."""
    if not run.get("average"):
        return []
    stage = run["average"][-1][0].split("×", 1)[-1]
    ends = [(s, m) for s, m in run["points"] if s in ("base", stage)]
    return [p for p in ends if p[0] == "base"] + list(run["average"]) + [p for p in ends if p[0] == stage]


def pick_plain(runs: list[dict], plain_dir: str | None) -> dict | None:
    """The run taxes are measured against: `plain_dir`, or the first run whose stages are all plain."""
    if plain_dir:
        want = Path(plain_dir).expanduser().resolve()
        found = next((r for r in runs if r["dir"].resolve() == want), None)
        if found is None:
            raise EvalError(f"--plain: {plain_dir} is not one of the report's run folders")
        return found
    return next((r for r in runs if r["plain"]), None)


def make_report(dirs: list[str], out_prefix: str, average: list[float] | None = None, average_runs: list[str] | None = None,
                average_stage: str | None = None, plain: str | None = None) -> tuple[Path, Path, str]:
    """Write PREFIX.md and PREFIX.png for the run folders; return (md path, png path, table).
    `average`: weight-averaging weights, for the runs in `average_runs` (default: every pipeline run)."""
    paths = [Path(d).expanduser() for d in dirs]
    chosen = {Path(d).expanduser().resolve() for d in average_runs} if average_runs else None
    if chosen and not chosen <= {p.resolve() for p in paths}:
        raise EvalError(f"--average-run: {sorted(map(str, chosen - {p.resolve() for p in paths}))[0]} is not one of the report's run folders")
    runs = [load_run(p) for p in paths]
    if average:
        from .average import average_curve, plan_average

        wanted = [r for r in runs if (r["dir"].resolve() in chosen if chosen else bool(r["spec"]))]
        # every run's curve is checked before any averaged model is written
        plans = [plan_average(r["dir"], r["spec"], r["from_eval"], average_stage) for r in wanted]
        for run, planned in zip(wanted, plans):
            run["average"] = [(label, _metrics(block)) for label, block in average_curve(planned, average)]
    label_runs(runs)
    table = markdown_table(runs, pick_plain(runs, plain))
    md = write_atomic(Path(f"{out_prefix}.md"), "# OGPSA report\n\n" + table + f"\n![safety vs capability]({Path(out_prefix).name}.png)\n")
    png = write_atomic(Path(f"{out_prefix}.png"), pareto_png(runs))
    return md, png, table


def main(argv: list[str] | None = None) -> int:
    """`ogpsa report` entry point; 0 on success, 2 on bad input."""
    p = argparse.ArgumentParser(prog="ogpsa report", description="Markdown table and Pareto plot of evaluated runs.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="pipeline output folders (pipeline.json) or folders with eval.json")
    p.add_argument("--out", default="ogpsa_report", help="output prefix: writes PREFIX.md and PREFIX.png (default ogpsa_report)")
    p.add_argument("--average", metavar="W,...", help="weight averaging: add (1-w) x start + w x stage for each weight in (0, 1)")
    p.add_argument("--average-run", action="append", metavar="DIR", help="average only this run (repeatable; default every pipeline run)")
    p.add_argument("--average-stage", metavar="NAME", help="the stage to average with the start (default each run's last)")
    p.add_argument("--plain", metavar="DIR", help="the plain run the tax is measured against (default: the first all-plain run)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        from .average import parse_weights

        weights = parse_weights(args.average) if args.average else None
        md, png, table = make_report(args.dirs, args.out, weights, args.average_run, args.average_stage, args.plain)
    except EvalError as e:
        print(f"ogpsa report: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"[ogpsa report] wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
