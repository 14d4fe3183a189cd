"""Activation: makes stock `llamafactory-cli train` understand OGPSA stages and pipeline recipes.

`arm()` registers a post-import hook (a `sys.meta_path` finder) that waits for three LLaMA-Factory
modules and wraps a few of their functions right after they are executed:

- `llamafactory.train.tuner`: the stage integration (`ogpsa.plugin.integration.patch_tuner`).
- `llamafactory.launcher`: `launch()` runs a recipe (a YAML with `stages:`) through the pipeline
  runner, validates `ogpsa_*` keys before anything starts (one-line error, exit 2), and makes
  torchrun workers start through `_worker/ogpsa_lf_worker.py`, which arms the hook itself, so
  `FORCE_TORCHRUN=1` works even where the `.pth` file is absent (editable installs).
- `llamafactory.webui.runner`: the OGPSA stages in LlamaBoard (`ogpsa.pipelines.webui.patch_runner`).

The installed `ogpsa_activate.pth` calls `arm()` at every interpreter start-up; until
`llamafactory` is imported nothing else happens, and any failure here only prints a warning:
Python start-up and stock LLaMA-Factory never break because of this package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker", "ogpsa_lf_worker.py")


def _patch_tuner(module) -> None:
    from ogpsa.plugin.integration import patch_tuner

    patch_tuner(module)


def _patch_launcher(module) -> None:
    if getattr(module, "__ogpsa_patched__", False):
        return
    original = module.launch

    def launch():
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        if command == "train" and len(sys.argv) > 2:
            code = _before_train(sys.argv[2], sys.argv[3:])
            if code is not None:
                sys.exit(code)
        saved = module.__file__
        module.__file__ = _WORKER  # torchrun (FORCE_TORCHRUN / several GPUs) runs this file per rank
        try:
            return _guarded(original)
        finally:
            module.__file__ = saved

    module.launch = launch
    module.__ogpsa_patched__ = True


def _patch_webui_runner(module) -> None:
    from .webui import patch_runner

    patch_runner(module)


_HOOKS = {
    "llamafactory.train.tuner": _patch_tuner,
    "llamafactory.launcher": _patch_launcher,
    "llamafactory.webui.runner": _patch_webui_runner,
}


def _apply(name: str, module) -> None:
    try:
        _HOOKS[name](module)
    except Exception as e:  # never break stock LLaMA-Factory because of this package
        sys.stderr.write(f"ogpsa: could not patch {name} ({e!r}); OGPSA stages are unavailable\n")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _apply(self.name, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the target modules with the other finders, then wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def arm() -> None:
    """Install the hook (idempotent); patch at once whatever target is already imported."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _HOOKS:
        if name in sys.modules:
            _apply(name, sys.modules[name])


def _guarded(fn, *args):
    """Run fn; turn OGPSA configuration errors into one line on stderr and exit code 2."""
    from ogpsa.plugin.settings import OGPSAConfigError

    try:
        return fn(*args)
    except OGPSAConfigError as e:
        sys.stderr.write(f"ogpsa: error: {e}\n")
        sys.exit(2)


def _before_train(config_path: str, overrides: list[str]) -> int | None:
    """Run a recipe, or validate an OGPSA config before launching; None lets LLaMA-Factory go on."""
    if not config_path.endswith((".yaml", ".yml", ".json")):
        return None
    from llamafactory.hparams import read_args

    saved = sys.argv
    sys.argv = [saved[0], config_path, *overrides]
    try:
        args = read_args()
    finally:
        sys.argv = saved
    if isinstance(args, dict) and "stages" in args:
        from .runner import run_recipe

        return _guarded(run_recipe, config_path, overrides)
    _guarded(_validate_stage_args, args, config_path)
    return None


def _validate_stage_args(args: dict, where: str) -> None:
    """The checks done before launch (OGPSAConfigError); `where` names the source, "" for none."""
    from ogpsa.plugin.engines import check_arguments
    from ogpsa.plugin.reference import check_registered
    from ogpsa.plugin.settings import split_ogpsa_args

    prefix = f"{where}: " if where else ""
    settings, stock = split_ogpsa_args(args, prefix)
    if settings is None:
        return
    check_arguments(stock.get, settings, prefix)
    if isinstance(stock.get("dataset_dir", "data"), str):
        check_registered(settings.reference_names, stock.get("dataset_dir", "data"))


def run_llamafactory_train(argv: list[str]) -> int:
    """`ogpsa train CONFIG [key=value ...]`: the same as `llamafactory-cli train`, hook armed."""
    arm()
    from llamafactory import launcher

    sys.argv = ["llamafactory-cli", "train", *argv]
    launcher.launch()
    return 0


def run_worker() -> int:
    """Entry of each torchrun rank: arm the hook, then LLaMA-Factory's own `run_exp`."""
    arm()
    from llamafactory.train.tuner import run_exp

    _guarded(run_exp)
    _exit_without_finalizing()
    return 0


def _exit_without_finalizing() -> None:
    """Leave a finished rank through its exit handlers but without interpreter finalization.

    torch's gloo process group releases the last collective's work object on its own thread. When
    that happens while Python finalizes, the thread cannot take the GIL, is unwound through C++
    frames, and the rank aborts ("terminate called without an active exception", exit -6) after
    the run completed and saved. Seen here in about 1 of 10 two-process CPU runs (DeepSpeed ZeRO-3,
    DPO under DDP; plain stages too); a core dump shows the gloo thread in ~AsyncAllgatherWork.
    Exit handlers (logging, wandb, tensorboard) still run first, as at a normal exit.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
