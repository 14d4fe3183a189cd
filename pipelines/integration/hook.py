"""The post-import hook: makes stock `llamafactory-cli train` understand OGPSA stages and recipes.

`arm()` registers a `sys.meta_path` finder that waits for four LLaMA-Factory modules and wraps a
few of their functions right after they are executed:

- `llamafactory.train.tuner`: the stage integration (`tuner.patch_tuner`).
- `llamafactory.launcher`: recipes, checks before launch, the torchrun worker (`launcher.patch_launcher`).
- `llamafactory.webui.runner`: the OGPSA stages in LlamaBoard (`webui.patch_runner`).
- `llamafactory.webui.components.train`: LlamaBoard's OGPSA accordion (`webui.patch_train_tab`),
  patched before `llamafactory.webui.components` imports its `create_train_tab` by name.

The installed `ogpsa_activate.pth` calls `arm()` at every interpreter start-up (through
`autoload`); until `llamafactory` is imported nothing else happens, and any failure here only
prints a warning: Python start-up and stock LLaMA-Factory never break because of this package.
"""

from __future__ import annotations

import importlib.abc
import sys


def _patch_tuner(module) -> None:
    from .tuner import patch_tuner

    patch_tuner(module)


def _patch_launcher(module) -> None:
    from .launcher import patch_launcher

    patch_launcher(module)


def _patch_webui_runner(module) -> None:
    from .webui import patch_runner

    patch_runner(module)


def _patch_webui_train_tab(module) -> None:
    from .webui import patch_train_tab

    patch_train_tab(module)


_HOOKS = {
    "llamafactory.train.tuner": _patch_tuner,
    "llamafactory.launcher": _patch_launcher,
    "llamafactory.webui.runner": _patch_webui_runner,
    "llamafactory.webui.components.train": _patch_webui_train_tab,
}


def _apply(name: str, module) -> None:
    try:
        _HOOKS[name](module)
    except Exception as e:  # never break stock LLaMA-Factory because of this package
        sys.stderr.write(f"ogpsa: could not patch {name} ({e!r}); what OGPSA adds there is unavailable\n")


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
