"""`ogpsa_method: gradient_span+null_space`: the gradient span inside the null space.

The null space (`methods/null_space`) holds the constrained layers' outputs on the reference
inputs, in those layers only; the gradient span (`methods/gradient_span`) holds every reference
loss to first order, in every tensor. Composed, with P the null-space projector of each
constrained matrix (G -> G P on its rows; the identity on every other tensor, zero on a constrained
layer's bias, which the null space holds fixed):

    build          the null spaces, once per stage (the first build, or a resume without a saved
                   state; LoRA: A <- A P while B = 0, as the null space alone); then, at every build,
                   each reference gradient r is projected, r <- P r, before it enters the span:
                   the basis U spans the projected gradients, so U P = U
    project_grad   g <- P g (the null space's), then g <- g - U^T U g (the span's)
    project_step   ogpsa_target=update: the null space's W <- W P + W_0 (I - P), then the span's
                   theta <- theta - U^T (U theta - c), on what the optimizer actually did

The final update d thus lies in every null space (d = P d: U's rows lie there, so removing U^T U d
keeps d there) and is orthogonal to the span (U d = 0), so for every raw reference gradient r

    <r, d> = <r, P d> = <P r, d> = 0          (P symmetric; P r is in the span of U)

Every reference loss is unchanged to first order in every tensor, and each constrained layer's
outputs on the reference inputs are kept as the null space alone keeps them. The two steps commute
(U P = U), so their order changes nothing but round-off.

The null spaces are not rebuilt with the span: NSPO builds them once, a rebuild under LoRA after B
has moved would change the model's function, and a span built inside one null space stays valid
while that null space is the one the updates are held to. `ogpsa_refresh_steps`,
`ogpsa_keep_previous`, `ogpsa_reference_rotation` and `ogpsa_directions_per_set` schedule and shape
the span as for `gradient_span` alone.

Runs on one process and DDP, what both methods support (`checks.py` refuses the rest before launch).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...constraint import BuildContext, SetupContext
from ...settings import COMPOSED, OGPSAArguments
from ...sharding import ShardLayout
from ..gradient_span.gradients import SetGradient
from ..gradient_span.method import GradientSpan
from ..null_space.maths import project_rows_
from ..null_space.method import NullSpace

# the null space's rebuild-record keys the span's record also has: prefixed with "null_"
_SHARED_KEYS = ("basis_bytes", "input_tokens/", "padded_tokens/", "method")


class SpanInNullSpace:
    """A `NullSpace` and a `GradientSpan` whose reference gradients are projected into the null spaces."""

    method = COMPOSED
    # ogpsa_target=update: the norm of what both step projections took out of the optimizer's step (the
    # null space's part is outside the null space, the span's inside it: orthogonal, their squares add up)
    step_removed_key = "update_removed_norm"

    def __init__(self, settings: OGPSAArguments):
        self.settings = settings
        self.null = NullSpace(settings)
        self.span = GradientSpan(settings)
        self.span.row_transform = self._into_null_space
        self.params: list[torch.nn.Parameter] = []
        self._index: dict[int, int] = {}  # id(parameter) -> its index among the trainable parameters
        self._kept: dict[str, float] = {}  # this build's |P r| / |r| per reference gradient

    @property
    def followup_due(self) -> bool:  # LoRA's A while B = 0: the span's follow-up (the null space needs none)
        return self.span.followup_due

    # ---- set-up -------------------------------------------------------------------------------
    def supports(self, layout: ShardLayout) -> Optional[str]:
        if layout.sharded:
            return f"{layout.engine}: ogpsa_method={COMPOSED} runs on one process or DDP only"
        return self.null.supports(layout) or self.span.supports(layout)

    def setup(self, ctx: SetupContext) -> None:
        self.params = ctx.params
        self._index = {id(p): i for i, p in enumerate(ctx.params)}
        self.null.setup(ctx)
        self.span.setup(ctx)

    def ready(self) -> bool:
        return self.null.ready() and self.span.ready()

    # ---- build --------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict[str, Any]:
        event: dict[str, Any] = {"method": COMPOSED, "null_space_built": not self.null.ready()}
        if not self.null.ready():
            for key, value in self.null.build(ctx).items():
                event[f"null_{key}" if key.startswith(_SHARED_KEYS) else key] = value
        self._kept = {}
        event.update(self.span.build(ctx))
        event["method"] = COMPOSED
        event.update({f"ref_kept/{name}": kept for name, kept in self._kept.items()})
        return event

    def _into_null_space(self, g: SetGradient) -> None:
        """r <- P r on one reference gradient's rows (whole parameters: one process or DDP), before the
        span takes it; logs |P r| / |r| (how much of the gradient the null spaces leave)."""
        rows = g.rows
        before = float(torch.stack(torch._foreach_norm(rows, 2, dtype=torch.float32)).square().sum())
        with torch.no_grad():
            for layer in self.null.layers:
                space = self.null.spaces[layer.space]
                for m in layer.matrices:
                    project_rows_(rows[self._index[id(m)]].view(m.shape), space)
                for b in layer.frozen:  # the null space holds these fixed: P = 0
                    rows[self._index[id(b)]].zero_()
        after = float(torch.stack(torch._foreach_norm(rows, 2, dtype=torch.float32)).square().sum())
        self._kept[g.name] = (after / before) ** 0.5 if before > 0 else 0.0

    # ---- the step -----------------------------------------------------------------------------
    def project_grad(self, group: int, measure: bool) -> None:
        self.null.project_grad(group, measure)
        self.span.project_grad(group, measure)

    def grad_record(self) -> Optional[dict[str, float]]:
        """The span's record (of the gradient it saw: after the null space's projection; its cosines are
        with the projected reference gradients, whose inner products with an update in the null space
        equal the raw ones'), and the null space's as null_grad_norm and null_removed_fraction."""
        span = self.span.grad_record()
        null = self.null.grad_record()
        if span is None:
            return None
        return {**span, "null_grad_norm": null["grad_norm"], "null_removed_fraction": null["removed_fraction"]}

    def project_step(self, group: int) -> float:
        return self.null.project_step(group) + self.span.project_step(group)

    # ---- checkpoint ---------------------------------------------------------------------------
    # The two states have no key in common (the span's basis, coords, followup_due, still_zero, turn;
    # the null space's spaces, layer_spaces, anchors), nor do their identities.
    def state_dict(self) -> dict[str, Any]:
        return {**self.span.state_dict(), **self.null.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.span.load_state_dict(saved)
        self.null.load_state_dict(saved)

    def identity(self) -> dict[str, Any]:
        return {**self.span.identity(), **self.null.identity()}

    def reshard(self, states: list[dict[str, Any]], pieces: list[list[tuple[int, int]]],
                mine: list[tuple[int, int]], device) -> dict[str, Any]:
        """The span's rows re-cut (`GradientSpan.reshard`); the null spaces are replicated, taken as saved.
        (The composition only ever saves a replicated state; this serves the protocol.)"""
        null = {k: states[0][k] for k in ("spaces", "layer_spaces", "anchors")}
        return {**self.span.reshard(states, pieces, mine, device), **null}
