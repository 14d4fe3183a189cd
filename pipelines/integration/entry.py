"""The processes this package starts with the hook armed: `ogpsa train` and each torchrun rank."""

from __future__ import annotations

import os
import sys

from .hook import arm
from .launcher import guarded


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

    guarded(run_exp)
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
