"""`llamafactory.launcher`: what `llamafactory-cli train` does before it launches.

`launch()` runs a recipe (a YAML with `stages:`) through the pipeline runner, checks `ogpsa_*` keys
before anything starts (`preflight`: one-line error, exit 2), and makes torchrun workers start
through `worker/ogpsa_lf_worker.py`, which arms the hook itself, so `FORCE_TORCHRUN=1` works even
where the `.pth` file is absent (editable installs).
"""

from __future__ import annotations

import os
import sys

from ...plugin.preflight import preflight
from ...plugin.settings import OGPSAConfigError

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker", "ogpsa_lf_worker.py")
PATCHED = "__ogpsa_patched__"


def patch_launcher(module) -> None:
    """Wrap `launch()` of `llamafactory.launcher` (idempotent)."""
    if getattr(module, PATCHED, False):
        return
    original = module.launch

    def launch():
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        if command == "train" and len(sys.argv) > 2:
            code = before_train(sys.argv[2], sys.argv[3:])
            if code is not None:
                sys.exit(code)
        saved = module.__file__
        module.__file__ = WORKER  # torchrun (FORCE_TORCHRUN / several GPUs) runs this file per rank
        try:
            return guarded(original)
        finally:
            module.__file__ = saved

    module.launch = launch
    setattr(module, PATCHED, True)


def guarded(fn, *args):
    """Run fn; turn OGPSA configuration errors into one line on stderr and exit code 2."""
    try:
        return fn(*args)
    except OGPSAConfigError as e:
        sys.stderr.write(f"ogpsa: error: {e}\n")
        sys.exit(2)


def before_train(config_path: str, overrides: list[str]) -> int | None:
    """Run a recipe, or check an OGPSA config before launching; None lets LLaMA-Factory go on."""
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
        from ..runner import run_recipe

        return guarded(run_recipe, config_path, overrides)
    if isinstance(args, dict):
        guarded(preflight, args, f"{config_path}: ")
    return None
