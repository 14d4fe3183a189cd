"""`ogpsa report DIR [DIR ...] [--out PREFIX] [--average 0.25,0.5,auto] [--plain DIR]`: the
safety/capability comparison of evaluated runs, with intervals: a compact table on the console,
the full table in PREFIX.md, a Pareto plot in PREFIX.png.

Each DIR is one run:
  * a pipeline output folder with `pipeline.json` = {"recipe": ..., "stages": [{"name", "stage",
    "output", "status", "eval": {<evaluate_model result>}}], "eval_base": {...} (optional)}; stages
    without an `eval` block take theirs from `DIR/eval.json` written by `ogpsa eval DIR` (matched by
    stage name), or
  * a folder holding an `eval.json` from `ogpsa eval` (one model, or the per-stage form of a
    pipeline folder).

PREFIX.md has one row per setting and stage: refusal rate on harmful prompts, over-refusal on
benign prompts, each capability NLL, their mean, HHH accuracy, then the comparison with plain.
PREFIX.png plots safety (refusal, higher is safer) against capability (mean answer NLL, lower is
better), one line per run through its stages, and over-refusal in a second panel.

Plain: each run is compared with the plain run trained with the same non-`ogpsa_*` settings (read
from each stage's `stage_config.yaml`: the same keys with `ogpsa_*` keys dropped and the OGPSA stage
types made plain), so a sweep over a learning rate or a seed compares each run with its own plain
run. `--plain DIR` names one plain run for every run instead; without settings to match, the first
run whose stages are all plain `sft`/`dpo` is used.

Seeds: runs whose settings differ only by `seed` are one row, the mean over their seeds.

Compared numbers (`ogpsa.pipelines.compare`), each with a 95% interval from a paired bootstrap over
probes (and seeds), 2,000 replicates, fixed seed, so the report is reproducible:
  * tax avoided per capability source X: 1 - (the run's rise) / (plain's rise), a rise being the
    stage's NLL on X minus the starting model's (`eval_base`), plain's taken at the stage of the same
    name: 100% keeps the starting model's NLL, 0% is plain's; "–" where plain did not raise X;
  * Δ refusal and Δ over-refusal: the run's rate minus plain's.
A row is at plain's refusal when its Δ refusal interval includes 0 or lies above it; the notes list
every row below it (its tax avoided is not at matched safety). The frontier marks the rows no
other row beats: lower NLL mean by its interval while at the other's refusal or above by that rule.
An eval.json written before per-probe results were kept still reads; its rows get no interval.

Weight averaging (runs with pipeline.json): the models (1 - w) x start + w x stage for the run's last
stage (`--average-stage NAME` for another), built once under `<run>/averages/`, evaluated with the
stage's own settings and cached (`ogpsa.pipelines.average`). `--average W,...` draws the curve for
the chosen runs (`--average-run DIR`, default every pipeline run). `auto` (alone or in the list)
calibrates averaging to plain's safety for every run, plain included: w goes down from 0.9 in steps
of 0.1 while the averaged model is still at plain's refusal by the rule above, and the last such w
is the row `auto w×stage` (w = 1 when already 0.9 falls below: the run itself).

The console shows a compact table (at most 100 characters wide) and names PREFIX.md; averaging and
evaluation write their logs to `<run>/averages/average.log` (`--verbose`: everything on the console).
Both files are written atomically (temp file + rename). The run label is the folder name (with its
parent when two folders share a name), plus the recipe name when the runs come from several recipes.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

from ..plugin.files import write_atomic

from .compare import Bootstrap, Cell, Member, Point, fmt_delta, fmt_pct
from .compare import frontier as frontier_marks
from .eval_config import EvalError
from .scoring import flat_metrics

COLUMNS = [("refusal_harmful", "refusal (harmful) ↑"), ("refusal_benign", "over-refusal (benign) ↓")]
TAIL = [("nll_mean", "NLL mean ↓"), ("hhh_acc", "HHH acc ↑"), ("hhh_acc_norm", "HHH acc (norm) ↑")]
CONSOLE_WIDTH = 100
STAGE_CONFIG = "stage_config.yaml"  # the runner's record of a stage's LLaMA-Factory arguments
# stage arguments that name where a run writes or starts from, not how it trains
_PLACES = ("output_dir", "overwrite_output_dir")
_SEED_PART = re.compile(r"(^|__)seed-[^_]+(?=__|$)")


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


def _point(ev: dict | None) -> Point:
    return Point.from_eval(ev, _metrics(ev) or {})


def _is_plain(stages: list[dict]) -> bool:
    kinds = [st.get("stage") for st in stages]
    return bool(kinds) and all(k and not str(k).startswith("ogpsa_") for k in kinds)


def _recipe_name(recipe) -> str | None:
    if isinstance(recipe, dict):
        return recipe.get("name") or recipe.get("path")
    return Path(str(recipe)).stem if recipe else None


def _stage_settings(stages: list[dict]) -> list[dict] | None:
    """Each stage's LLaMA-Factory arguments from the runner's `stage_config.yaml` (None if any is missing)."""
    import yaml

    found = []
    for st in stages:
        path = Path(str(st.get("output") or "")) / STAGE_CONFIG
        try:
            found.append(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError):
            return None
    return found or None


def load_run(run_dir: Path) -> dict:
    """{"dir", "recipe", "plain", "points": [(stage name, metrics)], "evals": {stage: eval block},
    "settings": per-stage arguments or None, "average": [], "auto": None} of one run folder (with its
    pipeline.json and eval.json stage blocks, for the averaging)."""
    pipe, ev_path = run_dir / "pipeline.json", run_dir / "eval.json"
    if not run_dir.is_dir():
        raise EvalError(f"run folder not found: {run_dir}")
    if not pipe.is_file() and not ev_path.is_file():
        raise EvalError(f"{run_dir}: neither pipeline.json nor eval.json found")
    spec = _read_json(pipe) if pipe.is_file() else {}
    ev = _read_json(ev_path) if ev_path.is_file() else {}
    run = {"dir": run_dir, "recipe": _recipe_name(spec.get("recipe")), "average": [], "auto": None,
           "spec": spec, "settings": None}
    if "model" in ev and "stages" not in ev:  # one model evaluated
        return {**run, "points": [("model", _metrics(ev))], "evals": {"model": ev}, "plain": False, "spec": {},
                "from_eval": {}}
    from_eval = {s.get("name"): s.get("eval") for s in ev.get("stages", [])}
    points, evals = [], {}
    base = spec.get("eval_base") or ev.get("eval_base")
    if base:
        points.append(("base", _metrics(base)))
        evals["base"] = base
    stages = spec.get("stages") or ev.get("stages") or []
    for i, st in enumerate(stages):
        name = st.get("name", f"stage{i}")
        block = st.get("eval") or from_eval.get(name)
        if block:
            points.append((name, _metrics(block)))
            evals[name] = block
    if not points:
        raise EvalError(f"{run_dir}: no evaluated stage (no `eval` blocks in pipeline.json, no eval.json)")
    return {**run, "points": points, "evals": evals, "plain": _is_plain(stages), "from_eval": from_eval,
            "settings": _stage_settings(stages) if spec.get("stages") else None}


def label_runs(runs: list[dict]) -> None:
    """Set run["label"]: folder name (parent/name on clashes), plus the recipe name when the runs come
    from more than one recipe."""
    names = [r["dir"].resolve().name for r in runs]
    several = len({r["recipe"] for r in runs}) > 1
    for run, name in zip(runs, names):
        label = f"{run['dir'].resolve().parent.name}/{name}" if names.count(name) > 1 else name
        run["label"] = f"{label} ({run['recipe']})" if several and run["recipe"] and run["recipe"] != name else label


# ---------------------------------------------------------------------- plain runs and seed groups


def settings_key(run: dict, plain: bool = False, seed: bool = True) -> str | None:
    """What a run trained, as a comparable string: every stage's arguments but where it writes and
    (after the first stage) which earlier folder it starts from. `plain`: the `ogpsa_*` keys dropped
    and OGPSA stages made plain, which is what its plain run trained. `seed=False`: the seed left out."""
    if not run.get("settings"):
        return None
    stages = []
    for i, args in enumerate(run["settings"]):
        kept = {k: v for k, v in args.items() if k not in _PLACES and not (i and k == "model_name_or_path")}
        if plain:
            kept = {k: v for k, v in kept.items() if not k.startswith("ogpsa_")}
            kept["stage"] = {"ogpsa_sft": "sft", "ogpsa_dpo": "dpo"}.get(kept.get("stage"), kept.get("stage"))
        if not seed:
            kept.pop("seed", None)
        stages.append(kept)
    return json.dumps(stages, sort_keys=True, default=str)


def match_plain(runs: list[dict], plain_dir: str | None) -> None:
    """Set run["plain_run"] for every run: `plain_dir`'s run, or the plain run of the same non-`ogpsa_*`
    settings, or (without settings to match) the first all-plain run."""
    if plain_dir:
        want = Path(plain_dir).expanduser().resolve()
        found = next((r for r in runs if r["dir"].resolve() == want), None)
        if found is None:
            raise EvalError(f"--plain: {plain_dir} is not one of the report's run folders")
        for r in runs:
            r["plain_run"] = found
        return
    plains = [r for r in runs if r["plain"]]
    by_key = {}
    for r in plains:
        by_key.setdefault(settings_key(r, plain=True), r)
    for r in runs:
        key = settings_key(r, plain=True)
        r["plain_run"] = r if r["plain"] else (by_key.get(key) if key else None) or (plains[0] if plains and key is None else None)


def pick_plain(runs: list[dict], plain_dir: str | None) -> dict | None:
    """The one plain run of `--plain DIR`, or the first all-plain run (the runs' own plain runs are in
    run["plain_run"], see `match_plain`)."""
    match_plain(runs, plain_dir)
    return next((r for r in runs if r["plain"]), None) if not plain_dir else runs[0]["plain_run"]


def _group_label(labels: list[str]) -> str:
    stripped = {_SEED_PART.sub("", lab).strip("_") or lab for lab in labels}
    if len(labels) == 1:
        return labels[0]
    return stripped.pop() if len(stripped) == 1 else f"{labels[0]} +{len(labels) - 1}"


def _seed_of(run: dict):
    settings = run.get("settings") or []
    return next((args["seed"] for args in settings if "seed" in args), None)


def build_rows(runs: list[dict], boot: Bootstrap) -> list[dict]:
    """The report's rows: per group of runs that differ only by seed, its stages, its averaging curve and
    its calibrated average, each a {"label", "stage", "kind", "cell", "m", "seeds", "w"}."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(settings_key(r, seed=False) or f"dir:{r['dir'].resolve()}", []).append(r)
    rows = []
    for members in groups.values():
        label = _group_label([r["label"] for r in members])
        entries: dict[tuple[str, str], list] = {}
        for r in members:
            for stage, _ in r["points"]:
                entries.setdefault(("stage", stage), []).append((r, r["evals"].get(stage), stage, None))
            for name, block in r.get("average") or []:
                entries.setdefault(("curve", name), []).append((r, block, name.split("×", 1)[-1], None))
            if r.get("auto"):
                name, block, w = r["auto"]
                entries.setdefault(("auto", name.split("×", 1)[-1]), []).append((r, block, name.split("×", 1)[-1], w))
        for (kind, name), items in entries.items():
            cell_members = []
            for r, block, stage, w in items:
                plain = r.get("plain_run")
                plain_block = plain["evals"].get(stage) if plain and stage != "base" else None
                cell_members.append(Member(
                    seed=_seed_of(r), point=_point(block), base=_point(r["evals"]["base"]) if "base" in r["evals"] else None,
                    plain=_point(plain_block) if plain_block else None,
                    plain_base=_point(plain["evals"]["base"]) if plain and "base" in plain["evals"] else None))
            cell = Cell(cell_members, boot)
            weights = [w for *_, w in items]
            if kind == "stage":
                row_label, stage_label = label, name
            elif kind == "curve":
                row_label, stage_label = f"{label} · average", name
            else:
                row_label = f"{label} · auto-average"
                stage_label = f"{'/'.join(f'{w:g}' for w in weights)}×{name}"
            means = {}
            for key in {k for m in cell_members for k in m.point.metrics}:
                v = cell.mean_metric(key)
                if v is not None:
                    means[key] = v
            rows.append({"label": row_label, "stage": stage_label, "kind": kind, "cell": cell, "m": means,
                         "seeds": len(items), "w": weights if kind == "auto" else None,
                         "compared": any(m.plain is not None for m in cell_members) and name != "base",
                         "runs": [r for r, *_ in items]})
    return rows


def compare_rows(rows: list[dict], nll_keys: list[str]) -> None:
    """Fill each row's tax avoided, Δ refusal and Δ over-refusal (with intervals) and the frontier mark."""
    labels = [k[4:] for k in nll_keys]
    for row in rows:
        if row["compared"]:
            row["tax"] = {k: row["cell"].tax_avoided(k[4:]) for k in nll_keys}
            row["d_refusal"] = row["cell"].delta_rate("harmful")
            row["d_over"] = row["cell"].delta_rate("benign")
            row["matched"] = row["cell"].at_plain_refusal()
    candidates = [r for r in rows if r["stage"] != "base" and r["m"].get("refusal_harmful") is not None
                  and r["m"].get("nll_mean") is not None]
    for row, mark in zip(candidates, frontier_marks([r["cell"] for r in candidates], labels)):
        row["frontier"] = mark


def _cell(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _notes(rows: list[dict], runs: list[dict], nll_keys: list[str], boot: Bootstrap) -> list[str]:
    notes = []
    compared = [r for r in rows if r["compared"]]
    if compared:
        plains = sorted({r["plain_run"]["label"] for r in runs if r.get("plain_run")})
        notes.append(f"Tax avoided: 1 - rise / plain's rise per source (rise = NLL minus the starting model's), each run against "
                     f"the plain run of its own non-ogpsa settings ({', '.join(plains)}), at the stage of the same name. "
                     f"Intervals: {100 * boot.level:.0f}%, paired bootstrap over probes"
                     + (" and seeds" if any(r["seeds"] > 1 for r in rows) else "")
                     + f", {boot.replicates} replicates, fixed seed.")
    for r in compared:
        if r.get("matched") is False:
            notes.append(f"- {r['label']}, {r['stage']}: below plain's refusal (Δ {fmt_delta(r['d_refusal'])}), "
                         "so its tax avoided is not at matched safety")
    if any(r["compared"] and r.get("d_refusal") and not r["d_refusal"].has_interval for r in rows):
        notes.append("- rows without an interval: their evaluations predate per-probe results (re-evaluate with `ogpsa eval` "
                     "for intervals); at plain's refusal then means a point estimate at or above plain's")
    for r in rows:
        if r["kind"] == "auto":
            notes.append(f"- {r['label']}: w = {', '.join(f'{w:g}' for w in r['w'])} chosen by the matched-refusal rule "
                         "(the largest pull-back toward the start still at plain's refusal, searched from 0.9 in steps of 0.1)")
    if any(r["plain"] for r in runs):
        for run in runs:
            if not run.get("plain_run"):
                notes.append(f"- {run['label']}: no plain run with the same non-ogpsa settings among the runs, so it is not "
                             "compared (add that plain run, or name one with --plain)")
    for run in runs:
        if run.get("auto_note"):
            notes.append(f"- {run['label']}: {run['auto_note']}")
    for plain in {id(r["plain_run"]): r["plain_run"] for r in runs if r.get("plain_run")}.values():
        for k in nll_keys:
            base = dict(plain["points"]).get("base") or {}
            last = next((m.get(k) for s, m in reversed(plain["points"]) if s != "base" and m), None)
            if base.get(k) is not None and last is not None and last - base[k] <= 0:
                notes.append(f"- {plain['label']} did not raise {k} ({last - base[k]:+.3f} at its last stage): no tax to avoid there")
    return notes


def markdown_table(rows: list[dict], runs: list[dict], boot: Bootstrap) -> str:
    """One row per setting and stage (and averaged point); columns: seeds (when any row has more than one),
    refusal rates, capability NLLs, NLL mean, HHH accuracy, judge and lm-eval metrics, then (with a plain
    run) tax avoided per source, Δ refusal and Δ over-refusal, each with its interval, and the frontier
    mark; notes under the table."""
    every = [r["m"] for r in rows]
    nll_keys = sorted({k for m in every for k in m if k.startswith("nll/")})
    lm_keys = sorted({k for m in every for k in m if k.startswith(("judge/", "lm_eval/"))})
    cols = COLUMNS + [(k, f"{k} ↓") for k in nll_keys] + TAIL + [(k, k) for k in lm_keys]
    seeds = any(r["seeds"] > 1 for r in rows)
    compared = any(r["compared"] for r in rows)
    extra = ([f"tax avoided {k[4:]} ↑" for k in nll_keys] + ["Δ refusal", "Δ over-refusal"]) if compared else []
    heads = (["seeds"] if seeds else []) + [h for _, h in cols] + extra + ["frontier"]
    lines = ["| run | stage | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for r in rows:
        cells = ([str(r["seeds"])] if seeds else []) + [_cell(r["m"].get(k)) for k, _ in cols]
        if compared:
            cells += [fmt_pct((r.get("tax") or {}).get(k)) for k in nll_keys]
            cells += [fmt_delta(r.get("d_refusal")), fmt_delta(r.get("d_over"))]
        cells.append("●" if r.get("frontier") else "")
        lines.append(f"| {r['label']} | {r['stage']} | " + " | ".join(cells) + " |")
    notes = _notes(rows, runs, nll_keys, boot)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def console_table(rows: list[dict], md_path: str | None = None, width: int = CONSOLE_WIDTH, legend: bool = True) -> str:
    """The few columns a person reads first, at most `width` characters a line: run, stage, refusal,
    over-refusal, tax avoided per source with its interval, frontier. Sources that do not fit are left
    to the full table (named on the last line)."""
    shown = [r for r in rows if r["stage"] != "base"]
    nll_keys = sorted({k for r in shown for k in r["m"] if k.startswith("nll/")})
    compared = any(r["compared"] for r in shown)
    taxes = {id(r): [fmt_pct((r.get("tax") or {}).get(k)) for k in nll_keys] for r in shown}
    tax_w = max([len(t) for ts in taxes.values() for t in ts] + [len(k[4:]) for k in nll_keys] + [4]) if compared else 0
    fixed = 2 + 6 + 2 + 6 + 2 + 1  # refusal, over-refusal, frontier and their gaps
    stage_w = min(max([len(r["stage"]) for r in shown] + [5]), 14)
    room = width - fixed - stage_w - 2
    n_src = len(nll_keys) if compared else 0
    while n_src and room - n_src * (tax_w + 2) < 16:
        n_src -= 1
    run_w = min(max([len(r["label"]) for r in shown] + [3]), room - n_src * (tax_w + 2))
    head = [f"{'run':<{run_w}}", f"{'stage':<{stage_w}}", f"{'refus.':>6}", f"{'over':>6}"]
    head += [f"{_fit(k[4:], tax_w):>{tax_w}}" for k in nll_keys[:n_src]] + ["F"]
    lines = ["  ".join(head)]
    for r in shown:
        cells = [f"{_fit(r['label'], run_w):<{run_w}}", f"{_fit(r['stage'], stage_w):<{stage_w}}",
                 f"{_cell(r['m'].get('refusal_harmful')):>6}", f"{_cell(r['m'].get('refusal_benign')):>6}"]
        cells += [f"{t:>{tax_w}}" for t in taxes[id(r)][:n_src]] + ["●" if r.get("frontier") else " "]
        lines.append("  ".join(cells))
    if not legend:
        return "\n".join(lines)
    key = "refus./over: refusal rate, harmful/benign prompts; F: frontier"
    if n_src:
        key += "; sources: tax avoided [95% CI]"
    lines.append(_fit(key, width))
    if n_src < len(nll_keys):
        lines.append(f"{len(nll_keys) - n_src} more source(s) in the full table")
    below = [r for r in shown if r.get("matched") is False]
    if below:
        lines.append(_fit("below plain's refusal (tax not at matched safety): "
                          + ", ".join(f"{r['label']} {r['stage']}" for r in below), width))
    if md_path:
        lines.append(_fit(f"full table and notes: {md_path}", width) if len(md_path) < width - 24 else f"full table: {md_path}")
    return "\n".join(lines)


def pareto_png(runs: list[dict], rows: list[dict] | None = None, title: str = "OGPSA: safety vs capability") -> bytes:
    """PNG bytes: refusal rate (harmful, left panel) and over-refusal (benign, right panel) against mean
    NLL (x, lower is better); one line per run through its stages, its averaging curve dashed, the
    frontier's points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows is None:
        rows = build_rows(runs, Bootstrap())
        compare_rows(rows, sorted({k for r in rows for k in r["m"] if k.startswith("nll/")}))
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


def run_row(dirs: list[str], target: str) -> str:
    """The compact rows of one finished run (`target`, one of `dirs`) against its plain run among `dirs`:
    what a sweep or the quickstart prints as each run is evaluated."""
    runs = [load_run(Path(d).expanduser()) for d in dirs]
    match_plain(runs, None)
    label_runs(runs)
    want = Path(target).expanduser().resolve()
    mine = [r for r in runs if r["dir"].resolve() == want]
    rows = build_rows(mine, Bootstrap())
    compare_rows(rows, sorted({k for r in rows for k in r["m"] if k.startswith("nll/")}))
    for row in rows:
        row.pop("frontier", None)  # a frontier among one run's own rows would mislead
    return console_table(rows, legend=False)


def _curve(run: dict) -> list[tuple[str, dict]]:
    """A run's averaging curve from its starting model to the averaged stage (empty without one)."""
    if not run.get("average"):
        return []
    stage = run["average"][-1][0].split("×", 1)[-1]
    ends = [(s, m) for s, m in run["points"] if s in ("base", stage)]
    curve = [(label, _metrics(block)) for label, block in run["average"]]
    return [p for p in ends if p[0] == "base"] + curve + [p for p in ends if p[0] == stage]


def _matched_check(plain_block: dict):
    """A function telling whether an evaluation is at `plain_block`'s refusal by the report's rule, with a
    bootstrap of its own (so a run's calibrated weight does not depend on which other runs are reported)."""
    def matched(block: dict) -> bool:
        cell = Cell([Member(None, _point(block), None, _point(plain_block), None)], Bootstrap())
        return bool(cell.at_plain_refusal())
    return matched


def add_averages(runs: list[dict], weights: list[float], auto: bool, chosen: set | None, stage: str | None,
                 verbose: bool) -> None:
    """The averaging curves (`weights`, for the chosen runs or every pipeline run) and, with `auto`, every
    pipeline run's calibrated average; every plan is checked before any averaged model is written."""
    from .average import average_curve, calibrate, plan_average

    curve_runs = [r for r in runs if (r["dir"].resolve() in chosen if chosen else bool(r["spec"]))] if weights else []
    auto_runs = [r for r in runs if r["spec"] and r.get("plain_run")] if auto else []
    wanted = {id(r): r for r in curve_runs + auto_runs}
    plans = {key: plan_average(r["dir"], r["spec"], r["from_eval"], stage) for key, r in wanted.items()}
    for run in curve_runs:
        run["average"] = average_curve(plans[id(run)], weights, verbose)
    for run in auto_runs:
        planned = plans[id(run)]
        name = planned["record"]["name"]
        plain_block = run["plain_run"]["evals"].get(name)
        if not plain_block or not run["evals"].get(name):
            run["auto_note"] = f"no calibrated average: no evaluation of stage {name!r} for it or its plain run"
            continue
        w, block = calibrate(planned, _matched_check(plain_block), run["evals"][name], verbose)
        if w is None:
            run["auto_note"] = f"no calibrated average: stage {name!r} itself is below plain's refusal"
        else:
            run["auto"] = (f"{w:g}×{name}", block, w)


def make_report(dirs: list[str], out_prefix: str, average: list[float] | None = None, average_runs: list[str] | None = None,
                average_stage: str | None = None, plain: str | None = None, auto: bool = False,
                verbose: bool = False) -> tuple[Path, Path, str]:
    """Write PREFIX.md and PREFIX.png for the run folders; return (md path, png path, compact console table).
    `average`: weight-averaging weights, for the runs in `average_runs` (default: every pipeline run);
    `auto`: every pipeline run's average calibrated to its plain run's refusal."""
    paths = [Path(d).expanduser() for d in dirs]
    chosen = {Path(d).expanduser().resolve() for d in average_runs} if average_runs else None
    if chosen and not chosen <= {p.resolve() for p in paths}:
        raise EvalError(f"--average-run: {sorted(map(str, chosen - {p.resolve() for p in paths}))[0]} is not one of the report's run folders")
    runs = [load_run(p) for p in paths]
    match_plain(runs, plain)
    if average or auto:
        add_averages(runs, average or [], auto, chosen, average_stage, verbose)
    label_runs(runs)
    boot = Bootstrap()
    rows = build_rows(runs, boot)
    nll_keys = sorted({k for r in rows for k in r["m"] if k.startswith("nll/")})
    compare_rows(rows, nll_keys)
    table = markdown_table(rows, runs, boot)
    md = write_atomic(Path(f"{out_prefix}.md"), "# OGPSA report\n\n" + table + f"\n![safety vs capability]({Path(out_prefix).name}.png)\n")
    png = write_atomic(Path(f"{out_prefix}.png"), pareto_png(runs, rows))
    return md, png, console_table(rows, str(md))


def parse_average(text: str | None) -> tuple[list[float], bool]:
    """'0.25,0.5,auto' -> ([0.25, 0.5], True); EvalError naming a bad value (see average.parse_weights)."""
    from .average import parse_weights

    if not text or text.strip().lower() == "none":
        return [], False
    parts = [p.strip() for p in text.split(",") if p.strip()]
    auto = "auto" in (p.lower() for p in parts)
    rest = [p for p in parts if p.lower() != "auto"]
    return (parse_weights(",".join(rest)) if rest else []), auto


def main(argv: list[str] | None = None) -> int:
    """`ogpsa report` entry point; 0 on success, 2 on bad input."""
    p = argparse.ArgumentParser(prog="ogpsa report", description="Safety/capability comparison of evaluated runs, with intervals.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="pipeline output folders (pipeline.json) or folders with eval.json")
    p.add_argument("--out", default="ogpsa_report", help="output prefix: writes PREFIX.md and PREFIX.png (default ogpsa_report)")
    p.add_argument("--average", metavar="W,...|auto",
                   help="weight averaging: (1-w) x start + w x stage for each weight in (0, 1); 'auto' (alone or in the "
                        "list): every run's average calibrated to its plain run's refusal")
    p.add_argument("--average-run", action="append", metavar="DIR",
                   help="draw the curve for this run only (repeatable; default every pipeline run)")
    p.add_argument("--average-stage", metavar="NAME", help="the stage to average with the start (default each run's last)")
    p.add_argument("--plain", metavar="DIR",
                   help="one plain run for every run (default: each run's plain run of the same non-ogpsa settings)")
    p.add_argument("--verbose", action="store_true", help="print the averaging and evaluation output instead of logging it")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        weights, auto = parse_average(args.average)
        md, png, table = make_report(args.dirs, args.out, weights, args.average_run, args.average_stage, args.plain,
                                     auto=auto, verbose=args.verbose)
    except EvalError as e:
        print(f"ogpsa report: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"[ogpsa report] wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
