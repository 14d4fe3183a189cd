"""`ogpsa sweep RECIPE --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2] [--out DIR] [--average W,...|auto]
[key=value ...]`: one recipe over a grid of settings, each run evaluated, one report with intervals
and the frontier.

    ogpsa sweep recipes/smollm2_sft_dpo.yaml --grid ogpsa_method=gradient_span,null_space \\
        --grid dpo.pref_beta=0.1,0.3 --seeds 0,1,2 --average 0.25,0.5,0.75,auto

Runs: one per combination of the grid, in `<out>/<key>-<value>__...`, plus the plain baseline in
`<out>/plain` (every `ogpsa_*` stage made plain; one plain run per combination of the grid's
non-`ogpsa_*` keys, since those change plain training too, and each run is compared with the plain
run of its own combination). `--seeds 0,1,2` is the grid key `seed=0,1,2` (a non-`ogpsa_*` key, so
every seed has its plain run too); the report folds the runs that differ only by seed into one row
with an interval over seeds and probes. A grid key applies to every stage,
overriding the stage's own value (`ogpsa_refresh_steps=8` reaches a recipe whose stages set their
own intervals); `STAGE.key` applies to one stage. Plain `key=value` arguments apply to every run.

Before anything trains, every run's recipe is resolved and validated as `ogpsa train` would
(unknown keys, OGPSA settings out of range, a method's keys on another method), and every grid
value of a LLaMA-Factory number or boolean field is checked for its type: a bad value stops the
sweep with one line naming the key and the value, exit 2, nothing written. The recipe needs an
`eval:` block: every run is evaluated by the runner.

Resume and reuse: each run is a pipeline folder of the runner (`ogpsa.pipelines.runner`), so
rerunning the command skips what is done. Across runs, a stage whose arguments (the output folder
aside), data and whole chain of earlier stages equal a finished stage of a run before it in this
sweep is not trained again: its record (with its model folder and evaluation) is written into the
later run's pipeline.json, under that run's lock, with the identity the runner itself computes, so
the runner skips it. The starting model's evaluation is shared the same way.

Report: `<out>/report.md` and `.png` (`ogpsa.pipelines.report`): every run, the plain runs'
weight-averaging curve (`--average`, default 0.25,0.5,0.75; `--average none` for none), every run's
average calibrated to its plain run's refusal (`auto` in `--average`), the tax each run avoids
against its own plain run with its interval, and the frontier column. The console shows the compact
table; every run's row is printed as soon as the run and its plain run are evaluated.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import re
import sys
import typing
from pathlib import Path

from ..plugin.files import short_hash as _sha
from ..plugin.files import write_json_atomic
from ..plugin.settings import PREFIX, OGPSAConfigError

from .eval_config import EvalError
from .identity import eval_identity, stage_identity, stage_inputs
from .lock import PipelineLock
from .recipe import RECIPE_KEYS, Recipe, RecipeError, llamafactory_train_keys, load
from .runner import STATE_FILE, Pipeline

DEFAULT_AVERAGE = "0.25,0.5,0.75"
PLAIN_TYPES = {"ogpsa_sft": "sft", "ogpsa_dpo": "dpo"}


class SweepError(RecipeError):
    """A grid or setting the sweep refuses; the message names the key and the value."""


# ------------------------------------------------------------------------------------------ grid


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['k=a,b', 's.k=c'] -> {'k': ['a', 'b'], 's.k': ['c']}; SweepError on a malformed or repeated key."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise SweepError(f"--grid {item}: expected KEY=V1,V2,... (e.g. ogpsa_refresh_steps=2,8)")
        if key in grid:
            raise SweepError(f"--grid {key}: given twice; list its values once, comma-separated")
        if key.split(".")[-1] in RECIPE_KEYS + ("output_dir", "overwrite_output_dir") or key.startswith("eval."):
            raise SweepError(f"--grid {key}: not a training setting (the sweep sets output folders and evaluates every run)")
        grid[key] = vals
    if not grid:
        raise SweepError("--grid: give at least one KEY=V1,V2,...")
    return grid


def _stage_overrides(key: str, value: str, stage_names: list[str]) -> list[str]:
    """A top-level grid key for every stage (so a stage's own value does not shadow it); STAGE.key as is."""
    if "." in key:
        return [f"{key}={value}"]
    return [f"{key}={value}"] + [f"{name}.{key}={value}" for name in stage_names]


def _folder_name(combo: dict[str, str]) -> str:
    parts = [f"{k}-{v}" for k, v in combo.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "__".join(parts)) or "run"


@dataclasses.dataclass
class Run:
    name: str
    folder: Path
    combo: dict[str, str]
    overrides: list[str]
    plain: bool
    recipe: Recipe | None = None


def plan(recipe_path: str, grid: dict[str, list[str]], extra: list[str], out: Path) -> list[Run]:
    """The sweep's runs, plain ones first, each validated; SweepError naming the first bad key/value."""
    try:
        first = load(recipe_path, list(extra))
    except OGPSAConfigError as e:
        raise SweepError(str(e)) from None
    if not first.eval:
        raise SweepError(f"{recipe_path}: eval: the sweep evaluates every run; add an eval: block to the recipe")
    names = [s.name for s in first.stages]
    plain_stages = [f"{s.name}.stage={PLAIN_TYPES.get(s.stage, s.stage)}" for s in first.stages]
    runs = []
    plain_keys = [k for k in grid if not k.split(".")[-1].startswith(PREFIX)]
    for combo_values in itertools.product(*(grid[k] for k in plain_keys)):
        combo = dict(zip(plain_keys, combo_values))
        name = "plain" + ("__" + _folder_name(combo) if combo else "")
        runs.append(Run(name, out / name, combo, _combo_overrides(combo, names) + plain_stages, True))
    for combo_values in itertools.product(*grid.values()):
        combo = dict(zip(grid, combo_values))
        name = _folder_name(combo)
        runs.append(Run(name, out / name, combo, _combo_overrides(combo, names), False))
    for run in runs:
        try:
            run.recipe = _validate(recipe_path, extra + run.overrides + [f"output_dir={run.folder}"], run.combo)
        except SweepError as e:
            raise _blame(recipe_path, extra, names, run.combo, e) from None
    return runs


def _blame(recipe_path: str, extra: list[str], names: list[str], combo: dict[str, str], error: SweepError) -> SweepError:
    """The error of a combination, naming the one grid value that fails the same way on its own when
    there is one (a value that fails only with another, such as a method's key on the other method,
    keeps the combination's name)."""
    said = str(error).split(": ", 1)[1]
    for key, value in combo.items():
        try:
            _validate(recipe_path, extra + _stage_overrides(key, value, names), {key: value})
        except SweepError as alone:
            if str(alone).split(": ", 1)[1] == said:
                return alone
    return error


def _combo_overrides(combo: dict[str, str], names: list[str]) -> list[str]:
    return [o for k, v in combo.items() for o in _stage_overrides(k, v, names)]


def _validate(recipe_path: str, overrides: list[str], combo: dict[str, str]) -> Recipe:
    where = " ".join(f"{k}={v}" for k, v in combo.items())
    try:
        recipe = load(recipe_path, overrides)
    except OGPSAConfigError as e:
        raise SweepError(f"--grid {where}: {e}") from None
    for key in combo:
        name = key.split(".")[-1]
        for spec in recipe.stages:
            if name in spec.args and name in llamafactory_train_keys():
                _check_type(name, spec.args[name], where)
    return recipe


_HINTS: dict[str, typing.Any] | None = None


def _field_hints() -> dict[str, typing.Any]:
    """{LLaMA-Factory key: its annotation} for the keys whose annotation can be resolved."""
    global _HINTS
    if _HINTS is None:
        from llamafactory.hparams.parser import _TRAIN_ARGS

        _HINTS = {}
        for cls in _TRAIN_ARGS:
            for klass in reversed(cls.__mro__):
                try:
                    _HINTS.update(typing.get_type_hints(klass))
                except Exception:  # a base class with annotations this Python cannot resolve: leave its keys unchecked
                    continue
    return _HINTS


def _check_type(key: str, value, where: str) -> None:
    """Refuse a string (or bool) where LLaMA-Factory declares a number, and a non-bool for a bool field."""
    hint = _field_hints().get(key)
    args = set(typing.get_args(hint)) - {type(None)} if typing.get_args(hint) else {hint}
    if value is None or not args <= {int, float, bool}:
        return
    ok = (isinstance(value, bool) if args == {bool}
          else isinstance(value, (int, float)) and not isinstance(value, bool) and (float in args or isinstance(value, int)))
    if not ok:
        kind = "/".join(sorted(t.__name__ for t in args))
        raise SweepError(f"--grid {where}: {key}={value!r} is not a {kind}")


# -------------------------------------------------------------------------------- stage reuse


def portable_keys(recipe: Recipe) -> list[str]:
    """One key per stage: its arguments without the output folder, its data's content and the chain of
    earlier stages' keys (from the starting model): equal keys train the same model."""
    base = os.path.abspath(recipe.base_model) if os.path.isdir(recipe.base_model) else recipe.base_model
    keys, previous = [], base
    for spec in recipe.stages:
        args = {k: v for k, v in spec.args.items() if k != "output_dir"}
        previous = _sha({"args": args, "stage": spec.stage, "prev": previous, "inputs": stage_inputs(spec)})
        keys.append(previous)
    return keys


def _read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": []}


def _usable(record: dict, identity: str) -> bool:
    """The runner would skip this stage: same identity, done, model folder in place."""
    return record.get("hash") == identity and record.get("status") == "done" and os.path.isdir(record.get("model", ""))


def _stamp(record: dict):
    """When the stage's training finished (its train_results.json), to notice a retrained source."""
    try:
        return os.stat(os.path.join(record.get("output", ""), "train_results.json")).st_mtime_ns
    except OSError:
        return None


def _chain(recipe: Recipe, records: dict[str, dict], known: dict[str, dict] | None = None) -> tuple[list[str], dict[str, str]]:
    """Walk the stages as the runner will, over `records` ({name: record}), while each is usable; with
    `known`, a stage that is not usable, or that was taken from a run whose stage has since been
    retrained, takes a copy of the finished stage of the same portable key (under the identity the
    runner computes), and every later stage is reset to pending (it trained from the old weights).
    Returns (the names taken, {portable key: name} of the usable stages)."""
    base = recipe.base_model
    start, previous, taken, usable = (os.path.abspath(base) if os.path.isdir(base) else base), "", [], {}
    for spec, key in zip(recipe.stages, portable_keys(recipe)):
        identity = stage_identity(spec, start, previous, stage_inputs(spec))
        record = records.get(spec.name) or {}
        source = (known or {}).get(key)
        stale = bool(source and record.get("reused_from") and record.get("reused_stamp") != _stamp(source))
        if stale or not _usable(record, identity):
            if source is None:
                break
            records[spec.name] = {**copy.deepcopy(source), "hash": identity, "reused_from": source.get("output"),
                                  "reused_stamp": _stamp(source)}
            taken.append(spec.name)
            for later in recipe.stages[spec.index + 1 :]:
                records[later.name] = {"name": later.name, "status": "pending"}
        usable[key] = spec.name
        start, previous = records[spec.name]["model"], identity
    return taken, usable


def finished_stages(run: Run) -> dict[str, dict]:
    """{portable key: record} of the stages `run` holds finished and valid (after it ran), and its
    starting model's evaluation under "eval_base"."""
    state = _read_state(run.folder)
    records = {r.get("name"): r for r in state.get("stages", [])}
    out = {key: records[name] for key, name in _chain(run.recipe, records)[1].items()}
    if state.get("eval_base"):
        out["eval_base"] = {"eval_base": state["eval_base"], "eval_base_hash": state.get("eval_base_hash")}
    return out


def seed(run: Run, known: dict[str, dict]) -> list[str]:
    """Write into `run`'s pipeline.json the finished stages of earlier runs it shares (see the module
    docstring); returns the names of the stages taken."""
    run.folder.mkdir(parents=True, exist_ok=True)
    with PipelineLock(str(run.folder)):
        state = _read_state(run.folder)
        records = {r.get("name"): r for r in state.get("stages", [])}
        taken = _chain(run.recipe, records, {k: v for k, v in known.items() if k != "eval_base"})[0]
        state["stages"] = [records.get(s.name, {"name": s.name, "status": "pending"}) for s in run.recipe.stages]
        base = known.get("eval_base")
        if base and not state.get("eval_base") and run.recipe.eval:
            model = run.recipe.base_model
            model = os.path.abspath(model) if os.path.isdir(model) else model
            if base["eval_base_hash"] == eval_identity(run.recipe.eval, model):
                state.update(base)
                taken.append("eval_base")
        if taken:
            write_json_atomic(run.folder / STATE_FILE, state)
    return taken


# ------------------------------------------------------------------------------------------- CLI


def sweep(recipe_path: str, grid_items: list[str], out: Path, extra: list[str], average: str | None,
          seeds: str | None = None) -> int:
    from .report import make_report, parse_average, run_row

    if seeds:
        if any(item.partition("=")[0].strip() == "seed" for item in grid_items):
            raise SweepError("--seeds: the grid already has a seed key; give the seeds once")
        grid_items = [*grid_items, f"seed={seeds}"]
    grid = parse_grid(grid_items)
    weights, auto = parse_average(average)
    runs = plan(recipe_path, grid, extra, out)
    print(f"[ogpsa sweep] {len(runs)} runs in {out}: " + ", ".join(r.name for r in runs), flush=True)
    known: dict[str, dict] = {}
    for run in runs:
        taken = seed(run, known)
        if taken:
            print(f"[ogpsa sweep] {run.name}: reusing {', '.join(taken)} of an earlier run", flush=True)
        print(f"[ogpsa sweep] run {run.name}", flush=True)
        code = Pipeline(run.recipe).run()
        if code:
            print(f"ogpsa sweep: run {run.name} failed (exit {code}); rerun the same command to resume", file=sys.stderr)
            return code
        for key, record in finished_stages(run).items():
            known.setdefault(key, record)
        done = [str(r.folder) for r in runs[: runs.index(run) + 1]]
        print(run_row(done, str(run.folder)), flush=True)
    plain = [str(r.folder) for r in runs if r.plain]
    md, png, table = make_report([str(r.folder) for r in runs], str(out / "report"), weights, plain if weights else None,
                                 auto=auto)
    print(table)
    print(f"[ogpsa sweep] report: {md}\n[ogpsa sweep] plot:   {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ogpsa sweep` entry point; 0 on success, 2 on a bad recipe, grid or setting."""
    p = argparse.ArgumentParser(prog="ogpsa sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a pipeline recipe (with stages: and an eval: block)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values (repeatable)")
    p.add_argument("--out", help="sweep folder (default runs/sweep_<recipe name>)")
    p.add_argument("--seeds", metavar="S1,S2", help="run every setting at these seeds (the grid key seed=S1,S2)")
    p.add_argument("--average", default=DEFAULT_AVERAGE,
                   help=f"weight-averaging weights for the plain runs' curve (default {DEFAULT_AVERAGE}; none: no curve); "
                        "'auto' in the list: every run's average calibrated to its plain run's refusal")
    try:
        args = p.parse_intermixed_args(argv)  # overrides may follow --grid
    except SystemExit as exc:  # usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    out = Path(args.out or f"runs/sweep_{Path(args.recipe).stem}").expanduser().resolve()
    try:
        return sweep(args.recipe, args.grid, out, args.overrides, args.average, args.seeds)
    except (OGPSAConfigError, EvalError) as e:
        print(f"ogpsa sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
