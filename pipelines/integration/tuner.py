"""`llamafactory.train.tuner`: the `ogpsa_sft` / `ogpsa_dpo` stages inside LLaMA-Factory's own tuner.

Three small wraps, applied once to the imported `llamafactory.train.tuner` module:

- `_training_function(config)`: when the arguments name an OGPSA stage, split off the `ogpsa_*`
  keys (checked by `preflight`), map the stage to LLaMA-Factory's `sft` / `dpo`, and add
  an `OGPSACallback` to the callbacks. LLaMA-Factory then runs its own workflow (`run_sft`,
  `run_dpo`) unchanged. Arguments without OGPSA keys pass through untouched.
- `get_train_args(args)`: hands the parsed LLaMA-Factory arguments to the pending callback (it
  needs the data arguments to tokenise the reference sets the way training does).
- `transformers.Trainer.log`: merges the callback's `ogpsa/...` metrics into the trainer's log
  record before it is stored and reported (trainer_state.json, tensorboard, wandb, ...).

`ogpsa_method: osf` gets an `OSFCallback` instead, and two more wraps (`osf.patch_osf`): the model
is wrapped with PEFT's OSF when LLaMA-Factory loads it, and the final save writes it merged.

The same callback works without any patching: `run_exp(args, callbacks=[cb])` after
`cb.bind(*get_train_args(args))` is all the stage integration does.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Optional

from ...plugin.callback import OGPSACallback
from ...plugin.osf import OSFCallback
from ...plugin.preflight import preflight
from ...plugin.settings import PREFIX, OGPSAArguments, OGPSAConfigError
from .osf import patch_osf, training_defaults

_PENDING: list[OGPSACallback | OSFCallback] = []
PATCHED = "__ogpsa_patched__"


def _flag(token: str) -> tuple[str, str | None]:
    """(key, value or None) of a `--key` or `--key=value` token."""
    key, eq, value = token[2:].partition("=")
    return key, (value if eq else None)


def _typed(key: str, text: str | None) -> Any:
    """An `ogpsa_*` flag's text as its OGPSAArguments field type (ints, floats; strings stay strings, and a
    wrong value is left for `split_ogpsa_args` to reject with its one-line message)."""
    if text is None:
        raise OGPSAConfigError(f"--{key}: expected a value")
    hint = typing.get_type_hints(OGPSAArguments).get(key)
    if hint in (int, Optional[int]) and re.fullmatch(r"[+-]?\d+", text.strip()):
        return int(text)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            pass
    return text


def split_argv(argv: list[str], where: str = "") -> tuple[OGPSAArguments | None, list[str]]:
    """(OGPSA settings or None, the stock flags) of a `--key value` / `--key=value` command line.

    Stock flags go back as the very strings they were, for LLaMA-Factory's own HfArgumentParser to
    type (so `--learning_rate 1e-5` is a float, as in a stock run); only the `ogpsa_*` flags are
    removed and typed here, and an OGPSA `--stage` value is mapped to LLaMA-Factory's stage.
    """
    ours: dict[str, Any] = {}
    stock: list[str] = []
    stage_at: int | None = None  # index in `stock` of the stage's value
    i = 0
    while i < len(argv):
        token = argv[i]
        key, value = _flag(token) if token.startswith("--") else ("", None)
        takes_next = value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if key.startswith(PREFIX):
            ours[key] = _typed(key, argv[i + 1] if takes_next else value)
            i += 2 if takes_next else 1
            continue
        if key == "stage" and (value is not None or takes_next):
            stock.append(token if value is None else "--stage")
            stock.append(argv[i + 1] if takes_next else value)
            stage_at = len(stock) - 1
            i += 2 if takes_next else 1
            continue
        stock.append(token)
        i += 1
    stage = stock[stage_at] if stage_at is not None else "sft"
    # only the settings here: the stock flags are typed by LLaMA-Factory, then checked by the callback's bind
    settings, mapped = preflight({"stage": stage, **ours}, where, check=False)
    if settings is None:
        return None, list(argv)
    if stage_at is not None:
        stock[stage_at] = mapped["stage"]
    return settings, stock


def prepare(args: dict[str, Any] | list[str] | None, callbacks: list | None, where: str = ""):
    """(stock args, callbacks) for LLaMA-Factory; adds an OGPSACallback for OGPSA stages."""
    if isinstance(args, list):
        settings, stock = split_argv(args, where)
    elif isinstance(args, dict):
        settings, stock = preflight(args, where)
    else:
        return args, callbacks, None
    if settings is None:
        return args, callbacks, None
    if settings.ogpsa_method == "osf":  # PEFT's OSF: the model is wrapped at load (integration/osf.py)
        callback = OSFCallback(settings)
    else:
        callback = OGPSACallback(settings)  # it drives the constraint settings.ogpsa_method names
    return stock, list(callbacks or []) + [callback], callback


def patch_tuner(tuner) -> None:
    """Wrap `_training_function` and `get_train_args` of `llamafactory.train.tuner` (idempotent)."""
    if getattr(tuner, PATCHED, False):
        return
    from llamafactory.hparams import read_args

    original_training_function = tuner._training_function
    original_get_train_args = tuner.get_train_args

    def _training_function(config: dict[str, Any]) -> None:
        args, callbacks, callback = prepare(read_args(config.get("args")), config.get("callbacks"))
        if callback is None:
            return original_training_function(config)
        _PENDING.append(callback)
        try:
            return original_training_function({**config, "args": args, "callbacks": callbacks})
        except OGPSAConfigError:
            callback.discard_empty_output_dir()  # the trainer made it; the run never started
            raise
        finally:
            _PENDING.remove(callback)

    def get_train_args(args=None):
        parsed = original_get_train_args(args)
        if _PENDING:
            _PENDING[-1].bind(*parsed)
            if isinstance(_PENDING[-1], OSFCallback):
                training_defaults(parsed[2])
        return parsed

    tuner._training_function = _training_function
    tuner.get_train_args = get_train_args
    setattr(tuner, PATCHED, True)
    patch_trainer_log()
    patch_osf(lambda: _PENDING[-1] if _PENDING else None)


def patch_trainer_log() -> None:
    """Make `Trainer.log` merge `ogpsa/...` metrics of an attached OGPSACallback (idempotent)."""
    from transformers import Trainer

    if getattr(Trainer.log, PATCHED, False):
        return
    original_log = Trainer.log

    def log(self, logs: dict[str, float], *args, **kwargs):
        # Only training-step records carry a loss and no eval_/train_ summary keys.
        if "loss" in logs and not any(k.startswith(("eval_", "train_")) for k in logs):
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, (OGPSACallback, OSFCallback)):
                    logs.update(cb.pop_log_metrics())
        return original_log(self, logs, *args, **kwargs)

    setattr(log, PATCHED, True)
    log.__doc__ = original_log.__doc__
    Trainer.log = log
