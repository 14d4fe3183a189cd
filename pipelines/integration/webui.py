"""LlamaBoard (`llamafactory-cli webui`): the OGPSA stages in the Train tab.

Applied by the activation hook when `llamafactory.webui.runner` is imported, which happens before
the page is built. Nothing of LlamaBoard is copied; its own tables and methods are extended:

- `TRAINING_STAGES` (label -> stage, read by the stage dropdown, the dataset filter and the runner)
  gets one label per OGPSA stage, and `STAGES_USE_PAIR_DATA` gets `ogpsa_dpo`, so the dataset list
  offers preference datasets for it, as for `dpo`. Both are LLaMA-Factory's own objects, changed
  in place, because its webui modules imported them by name.
- `Runner._parse_train_args` builds the arguments of the OGPSA stage as those of its stock stage
  (so the stage's own fields, e.g. DPO's beta, ftx and loss, come along), then names the OGPSA stage.
  The `ogpsa_*` settings come from the page's extra-arguments box (a JSON dict), as any other key.
- `Runner._initialize` (LlamaBoard's check before preview, start and save) also runs the checks of
  `llamafactory-cli train`, so a bad `ogpsa_*` key shows its one-line error on the page and nothing
  starts. The launched `llamafactory-cli train` checks again (exit code 2), as for any YAML.
"""

from __future__ import annotations

from typing import Any

from ...plugin.preflight import preflight
from ...plugin.settings import OGPSA_STAGES, OGPSAConfigError

# Labels in LlamaBoard's stage dropdown; the stock ones are "Supervised Fine-Tuning" and "DPO".
STAGE_LABELS = {"OGPSA Supervised Fine-Tuning": "ogpsa_sft", "OGPSA DPO": "ogpsa_dpo"}
_PATCHED = "__ogpsa_patched__"


def patch_runner(runner_module) -> None:
    """Register the stages and wrap the Runner of `llamafactory.webui.runner` (idempotent)."""
    runner = runner_module.Runner
    if getattr(runner, _PATCHED, False):
        return
    parse, initialize = _wrap_parse_train_args(runner._parse_train_args), _wrap_initialize(runner._initialize)
    runner._parse_train_args, runner._initialize = parse, initialize
    register_stages()  # last: if anything above fails, the page keeps its stock stage list only
    setattr(runner, _PATCHED, True)


def register_stages() -> None:
    from llamafactory.extras import constants

    constants.TRAINING_STAGES.update(STAGE_LABELS)
    paired = [stage for stage, stock in OGPSA_STAGES.items() if stock in constants.STAGES_USE_PAIR_DATA]
    constants.STAGES_USE_PAIR_DATA.update(paired)  # ogpsa_dpo: preference datasets, as for dpo


def _stock_label(stock_stage: str) -> str:
    from llamafactory.extras.constants import TRAINING_STAGES

    return next(label for label, stage in TRAINING_STAGES.items() if stage == stock_stage)


def _wrap_parse_train_args(original):
    def _parse_train_args(self, data: dict) -> dict[str, Any]:
        stage_elem = self.manager.get_elem_by_id("train.training_stage")
        stage = STAGE_LABELS.get(data[stage_elem])
        if stage is None:
            return original(self, data)
        stock = OGPSA_STAGES[stage]
        args = original(self, {**data, stage_elem: _stock_label(stock)})
        if args.get("stage") == stock:  # else the extra-arguments box named a stage: it has the last word
            args["stage"] = stage
        return args

    _parse_train_args.__doc__ = original.__doc__
    return _parse_train_args


def _wrap_initialize(original):
    def _initialize(self, data: dict, do_train: bool, from_preview: bool) -> str:
        error = original(self, data, do_train, from_preview)
        return error or (ogpsa_error(self, data) if do_train else "")

    _initialize.__doc__ = original.__doc__
    return _initialize


def ogpsa_error(runner, data: dict) -> str:
    """The OGPSA error of the page's training arguments as one line, or "" when they are fine."""
    try:
        args = runner._parse_train_args(data)
    except Exception:  # noqa: BLE001 - a malformed stock field (learning rate "abc"): LlamaBoard reports it
        return ""
    try:
        preflight(args)
    except OGPSAConfigError as e:
        return f"ogpsa: error: {e}"
    return ""
