"""The constraint interface: what a method (`ogpsa_method`) is to the callback that drives it.

A constraint keeps its state (a basis, null spaces, what a step must restore) apart from the
trainer. `OGPSACallback` (`callback.py`) owns everything else: the schedule (when to build, the
resume), the trainer slots (including the ZeRO `_optimizer_step` wrap), logging and checkpoint
I/O. It calls a constraint in this order:

    supports(layout) -> str     once, at train start, first: None, or why this engine's layout
                                cannot work (the callback refuses the run with it)
    setup(SetupContext)         once, at train start: pick what is constrained, refuse what cannot work
    build(BuildContext) -> {}   at step 0 and every `ogpsa_refresh_steps` (and a follow-up when
                                `followup_due`): measure the reference sets, make the new state;
                                returns the method's fields of the "rebuild" log record
    project_grad(group)         per optimizer group, before optimizer.step() (the accumulated,
                                synchronised, clipped gradient)
    grad_record() -> {} | None  this step's statistics (None: nothing was projected, the engine skipped)
    project_step(group) -> x2   per group, after optimizer.step(): the squared norm it removed
    state_dict() / load_state_dict(saved) / identity()   checkpoint payload and what a saved one
                                must share with this run to be used on resume
    reshard(states, pieces, mine, device) -> saved   on resume under another layout (world size,
                                engine): this rank's state for `load_state_dict`, cut to its pieces
                                `mine` from every saved rank's state and pieces (`checkpoint.py`)

A method is one module holding one class with these members, plus one line in `REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from .settings import OGPSAArguments, OGPSAConfigError

# ogpsa_method -> "module:class" of its constraint (imported on first use).
REGISTRY = {
    "gradient_span": "methods.gradient_span.method:GradientSpan",
    "null_space": "methods.null_space.method:NullSpace",
    "gradient_span+null_space": "methods.composed.method:SpanInNullSpace",
}


@dataclass
class SetupContext:
    """What a constraint may use at train start."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # the trainable parameters, in model order
    layout: Any  # sharding.ShardLayout: where this rank's piece of each parameter lives
    is_main: bool  # rank 0 (logs once)


@dataclass
class BuildContext:
    """What a constraint may use when it builds its state at the current weights."""

    model: torch.nn.Module
    refs: list  # reference.ReferenceSet, tokenised once
    collator: Any
    step: int  # the trainer's global_step
    world_size: int
    is_main: bool
    followup: bool  # a follow-up rebuild (see `followup_due`)
    # reference_pass(label, refs=None) -> (micro-batch size, progress bar over this rank's micro-batches
    # of `refs`, default `self.refs`)
    reference_pass: Callable[..., tuple[int, Any]] = field(repr=False)


class Constraint(Protocol):
    """The members `OGPSACallback` uses (see the module docstring for the order)."""

    method: str  # the `ogpsa_method` value
    step_removed_key: str  # log key of the norm `project_step` removes (ogpsa_target: update)
    followup_due: bool  # build again at the next step (e.g. LoRA's A had no gradient yet)

    def supports(self, layout: Any) -> Optional[str]: ...

    def setup(self, ctx: SetupContext) -> None: ...

    def ready(self) -> bool: ...

    def build(self, ctx: BuildContext) -> dict[str, Any]: ...

    def project_grad(self, group: int, measure: bool) -> None: ...

    def grad_record(self) -> Optional[dict[str, float]]: ...

    def project_step(self, group: int) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...

    def identity(self) -> dict[str, Any]: ...

    def reshard(self, states: list[dict[str, Any]], pieces: list[list[tuple[int, int]]],
                mine: list[tuple[int, int]], device) -> dict[str, Any]: ...


def make(settings: OGPSAArguments) -> Constraint:
    """The constraint `settings.ogpsa_method` names."""
    target = REGISTRY.get(settings.ogpsa_method)
    if target is None:
        raise OGPSAConfigError(f"ogpsa_method: expected one of {sorted(REGISTRY)}, got {settings.ogpsa_method!r}")
    module, name = target.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)(settings)
