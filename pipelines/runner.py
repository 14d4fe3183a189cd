"""Runs a recipe: each stage through `llamafactory-cli train`, chained, resumable.

Handoff: a stage trains from the previous stage's result. Full and freeze fine-tuning pass the
saved model folder; LoRA merges the stage's adapter into the model it started from with
LLaMA-Factory's own export (`<NN>_<name>/merged`) and passes that. The DPO reference model is
therefore the DPO stage's starting model (LLaMA-Factory's default when `ref_model` is unset).
OGPSA stages rebuild the capability subspace at their first step against that starting model.

State lives in `<output_dir>/pipeline.json` (written atomically). Running the same command again
skips stages whose identity is unchanged and that finished with their model folder in place. The
identity (`ogpsa.pipelines.identity`) is the stage's arguments, its starting model, the chain
before it and the content of every dataset and reference set it reads, with their
dataset_info.json entries. A stage that was interrupted resumes from its last checkpoint
(LLaMA-Factory's own resume). A changed stage, a finished one whose model folder is gone, and
every stage after either rerun from scratch; `force=true` (or `ogpsa train RECIPE --force`)
reruns everything. An evaluation is redone when the `eval:` block or a file it reads changed.
`<output_dir>/pipeline.lock` keeps a second runner off the folder (`ogpsa.pipelines.lock`).

Each stage is a child process (`python -m ogpsa.pipelines.cli train <stage>.yaml`) that inherits
the environment, so FORCE_TORCHRUN / NPROC_PER_NODE and a `deepspeed:` key behave as in a single
stock LLaMA-Factory run.

Output (`ogpsa.pipelines.console`): a line when a stage or an evaluation starts and ends (folder,
log file, duration, key numbers) and one progress bar for each. The full output of a stage (its
training and, for LoRA, its merge) is appended to `<NN>_<name>/train.log`, that of its evaluation
to `<NN>_<name>/eval.log` (the starting model's: `<output_dir>/eval_base.log`). A failure shows the
last lines of its log. `verbose` (`--verbose`) lets everything through to the terminal instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import yaml

from ..plugin.files import short_hash, write_json_atomic
from .console import Console, Progress, TrainerSteps, eval_summary, seconds, stage_summary
from .identity import eval_identity, stage_identity, stage_inputs
from .lock import PipelineLock
from .recipe import Recipe, RecipeError, StageSpec, load

STATE_FILE = "pipeline.json"
STAGE_LOG = "train.log"
EVAL_LOG = "eval.log"
BASE_EVAL_LOG = "eval_base.log"


class PipelineFailed(Exception):
    """A stage or an evaluation failed; the message names it and its log."""


def run_recipe(path: str, overrides: list[str] | None = None, verbose: bool = False) -> int:
    """Entry of `llamafactory-cli train RECIPE` / `ogpsa train RECIPE`; returns an exit code.
    `--force` and `--verbose` may come among the overrides."""
    overrides = list(overrides or [])
    if "--force" in overrides:
        overrides = [o for o in overrides if o != "--force"] + ["force=true"]
    if "--verbose" in overrides:
        overrides, verbose = [o for o in overrides if o != "--verbose"], True
    recipe = load(path, overrides)
    return Pipeline(recipe, Console(verbose)).run()


class Pipeline:
    def __init__(self, recipe: Recipe, console: Console | None = None):
        self.recipe = recipe
        self.console = console or Console()
        self.root = os.path.abspath(recipe.output_dir)
        self.state_path = os.path.join(self.root, STATE_FILE)
        self.state: dict = {}
        self._eval_id: str | None = None  # computed once per run, at the first stage evaluation

    # ---- orchestration -------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.root, exist_ok=True)
        with PipelineLock(self.root):
            self.state = self._load_state()  # read under the lock: a finishing runner may still write it
            try:
                return self._run_stages()
            except PipelineFailed as e:
                sys.stderr.write(f"ogpsa: {e}\n")
                return 1

    def _run_stages(self) -> int:
        base = self.recipe.base_model
        start_model = os.path.abspath(base) if os.path.isdir(base) else base  # a local folder or a Hub id
        previous_hash, changed = "", self.recipe.force
        self._eval_base(start_model)
        for spec in self.recipe.stages:
            inputs = stage_inputs(spec)
            identity = stage_identity(spec, start_model, previous_hash, inputs)
            record = self._record(spec)
            rerun = self._why_rerun(record, identity, inputs, changed)
            if rerun is None:
                self.console.say(f"stage {spec.dirname}: unchanged and done, skipped")
            else:
                if rerun:
                    self.console.say(f"stage {spec.dirname}: {rerun}; training it from scratch")
                changed = changed or bool(rerun)  # a retrained stage invalidates every later one
                fresh = changed or record.get("status") not in ("running", "failed")
                code = self._run_stage(spec, record, identity, start_model, fresh, inputs)
                if code != 0:
                    return code
            self._evaluate(spec, record)
            start_model, previous_hash = record["model"], identity
        self.console.say(f"pipeline done: {self.state_path}")
        return 0

    @staticmethod
    def _why_rerun(record: dict, identity: str, inputs: dict, changed: bool) -> str | None:
        """None: reuse the stage's result; "": run it (first time, or resume); else why it restarts."""
        if changed:
            return "force=true" if record.get("hash") else ""
        if record.get("hash") != identity:
            return f"changed ({_what_changed(record, inputs)})" if record.get("hash") else ""
        if record.get("status") != "done":
            return ""  # interrupted or failed: resume
        if not os.path.isdir(record.get("model", "")):
            return f"finished, but its model folder {record.get('model')} is gone"
        return None

    def _run_stage(
        self, spec: StageSpec, record: dict, identity: str, start_model: str, fresh: bool, inputs: dict
    ) -> int:
        out = os.path.join(self.root, spec.dirname)
        if fresh:
            record.clear()
            self._invalidate_after(spec.index)
            if os.path.isdir(out):
                shutil.rmtree(out)  # a changed stage restarts; its old results would mislead resume
        os.makedirs(out, exist_ok=True)
        args = {**spec.args, "model_name_or_path": start_model, "output_dir": out, "overwrite_output_dir": False}
        record.update(name=spec.name, stage=spec.stage, hash=identity, start_model=start_model, output=out)
        # a dataset's digest as stored in pipeline.json: one hash for its entry and its content
        record["inputs"] = {name: short_hash(d) for name, d in inputs.items()}
        record.update(status="running", resumed=not fresh, eval=None)
        self._save()
        log = os.path.join(out, STAGE_LOG)
        self.console.say(f"stage {spec.dirname} ({spec.stage}) from {start_model}" + ("" if fresh else " (resuming)")
                         + ("" if self.console.verbose else f"; log: {log}"))
        started = time.time()
        trained = os.path.exists(os.path.join(out, "train_results.json"))  # failed after training
        if not trained:
            config = _write_yaml(out, "stage_config.yaml", args)
            code = _launch(["train", config], console=self.console, log=log, label=spec.dirname,
                           progress=TrainerSteps(out))
        else:
            code = 0
        if code == 0 and args.get("finetuning_type", "lora") == "lora":
            code = self._merge_lora(args, out, log, spec.dirname)
        record["wall_seconds"] = round(time.time() - started + record.get("wall_seconds_before", 0.0), 2)
        if code != 0:
            record["status"] = "failed"
            record["wall_seconds_before"] = record["wall_seconds"]
            self._save()
            where = "" if self.console.verbose else f"; full log: {log}"
            sys.stderr.write(f"ogpsa: stage {spec.name!r} failed (exit {code}){where}; rerun the same command to resume\n")
            return code
        record.pop("wall_seconds_before", None)
        record.update(status="done", model=record.get("model_dir", out), metrics=summarize(out))
        self._save()
        summary = stage_summary(record["metrics"])
        self.console.say(f"stage {spec.dirname} done in {seconds(time.time() - started)}"
                         + (f": {summary}" if summary else "") + f"; model: {record['model']}")
        return 0

    def _invalidate_after(self, index: int) -> None:
        """Forget the stages after `index`: they trained from its old result, so even if this run stops
        half-way, the next one must not reuse them."""
        for later in self.recipe.stages[index + 1 :]:
            self.state["stages"][later.index] = {"name": later.name, "status": "pending"}

    def _merge_lora(self, args: dict, out: str, log: str, label: str) -> int:
        merged = os.path.join(out, "merged")
        export = {
            "model_name_or_path": args["model_name_or_path"],
            "adapter_name_or_path": out,
            "template": args.get("template", "default"),
            "finetuning_type": "lora",
            "export_dir": merged,
        }
        for key in ("trust_remote_code", "cache_dir"):
            if key in args:
                export[key] = args[key]
        self.console.say(f"stage {label}: merging the LoRA adapter into {merged}")
        code = _launch(["export", _write_yaml(out, "export_config.yaml", export)], llamafactory=True,
                       console=self.console, log=log, label=f"{label} merge")
        if code == 0:
            self._record_by_output(out)["model_dir"] = merged
        return code

    # ---- evaluation (optional `eval:` block) ---------------------------------------------------
    def _eval_base(self, model: str) -> None:
        log = os.path.join(self.root, BASE_EVAL_LOG)
        self._evaluate_into(self.state, "eval_base", model, eval_identity(self.recipe.eval, model), log, "base model")

    def _evaluate(self, spec: StageSpec, record: dict) -> None:
        # the eval identity leaves the model out: retraining a stage clears its evaluation anyway
        if self._eval_id is None:
            self._eval_id = eval_identity(self.recipe.eval)
        log = os.path.join(self.root, spec.dirname, EVAL_LOG)
        self._evaluate_into(record, "eval", record["model"], self._eval_id, log, spec.dirname)

    def _evaluate_into(self, record: dict, key: str, model: str, identity: str, log: str, label: str) -> None:
        """Evaluate `model` into record[key] unless an evaluation of the same identity is there."""
        if self.recipe.eval and (not record.get(key) or record.get(f"{key}_hash") != identity):
            record[key] = self._evaluate_model(model, log, label)
            record[f"{key}_hash"] = identity
            self._save()

    def _evaluate_model(self, model: str, log: str, label: str) -> dict:
        """`ogpsa eval`'s evaluate_model on `model`, in this process; quiet: its output in `log`."""
        from .scoring import evaluate_model

        self.console.say(f"evaluating {label}: {model}" + ("" if self.console.verbose else f"; log: {log}"))
        started = time.time()
        if self.console.verbose:
            return evaluate_model(model, self.recipe.eval)
        try:
            with self.console.captured(log, f"eval {label}"):
                result = evaluate_model(model, self.recipe.eval)
        except Exception as e:
            raise PipelineFailed(f"evaluation of {label} failed ({type(e).__name__}: {e}); full log: {log}") from None
        self.console.say(f"evaluation of {label} done in {seconds(time.time() - started)}: {eval_summary(result)}")
        return result

    # ---- state ------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
        else:
            state = {"stages": []}
        state.update(recipe=self.recipe.path, recipe_sha256=self.recipe.sha256)
        names = [s.name for s in self.recipe.stages]
        by_name = {r.get("name"): r for r in state.get("stages", [])}
        state["stages"] = [by_name.get(n, {"name": n, "status": "pending"}) for n in names]
        return state

    def _record(self, spec: StageSpec) -> dict:
        return self.state["stages"][spec.index]

    def _record_by_output(self, out: str) -> dict:
        return next(r for r in self.state["stages"] if r.get("output") == out)

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state)


def summarize(out: str) -> dict[str, Any]:
    """Key metrics of a finished stage: final loss and the OGPSA summary."""
    metrics: dict[str, Any] = {}
    results = os.path.join(out, "train_results.json")
    if os.path.exists(results):
        with open(results, encoding="utf-8") as f:
            metrics.update(json.load(f))
    log_path = os.path.join(out, "ogpsa_log.jsonl")
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        steps = [r for r in rows if "removed_fraction" in r]
        rebuilds = [r for r in rows if r.get("event") == "rebuild"]
        summary = {
            "rebuilds": len(rebuilds),
            "rebuild_seconds": round(sum(r["seconds"] for r in rebuilds), 4),
            "mean_removed_fraction": sum(r["removed_fraction"] for r in steps) / max(len(steps), 1),
        }
        for key in sorted({k for r in steps for k in r if k.startswith("cos/")}):
            summary[f"mean_{key}"] = sum(r.get(key, 0.0) for r in steps) / max(len(steps), 1)
        metrics["ogpsa"] = summary
    return metrics


def _what_changed(record: dict, inputs: dict) -> str:
    """What differs from a stage's last run, for the log line."""
    before = record.get("inputs") or {}
    data = sorted(n for n, d in inputs.items() if before.get(n) != short_hash(d))
    return f"data: {', '.join(data)}" if data else "arguments or starting model"


def _write_yaml(directory: str, name: str, args: dict) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(args, f, sort_keys=False)
    return path


def _launch(argv: list[str], llamafactory: bool = False, *, console: Console, log: str, label: str,
            progress: Progress | None = None) -> int:
    """A child Python that runs one LLaMA-Factory command with the OGPSA hook armed."""
    module = "llamafactory.cli" if llamafactory else "ogpsa.pipelines.cli"
    return console.run([sys.executable, "-m", module, *argv], log, label, progress)


__all__ = ["run_recipe", "Pipeline", "PipelineFailed", "RecipeError", "summarize", "STATE_FILE", "STAGE_LOG",
           "EVAL_LOG", "BASE_EVAL_LOG"]
