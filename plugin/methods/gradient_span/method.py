"""`ogpsa_method: gradient_span` (OGPSA): the constraint that removes from every step its component
along the reference sets' gradients (the maths is `maths.py`, the gradients `gradients.py`).

    build                the reference sets' NLL gradients at the current weights, orthonormalised
                         into a `SubspaceBasis` (streaming Gram-Schmidt into the basis rows)
    project_grad         g <- g - U^T U g on the accumulated, synchronised, clipped gradient; with
                         ogpsa_target=update, also note the weights' coordinates c = U theta
    project_step         ogpsa_target=update only: theta <- theta - U^T (U theta - c), on the float32
                         master weights, so the step the optimizer actually took (Adam's rescaling,
                         weight decay) is orthogonal too

It works on this rank's piece of every trainable parameter (`sharding.ShardLayout`): whole
parameters on one process and under DDP, partitions under ZeRO-1/2/3 and FSDP2, with the inner
products summed over ranks.

With ogpsa_reference_rotation a build reads one share of every set and keeps the others' latest
gradients from the basis (`rotation.py`). `row_transform` lets a constraint that composes this one
change each new reference gradient before it is orthonormalised (`methods/composed`: into the null
spaces).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from llamafactory.extras.logging import get_logger

from ... import dist
from ...checkpoint import cut as checkpoint_cut
from ...constraint import BuildContext, SetupContext
from ...reference import ReferenceDataError
from ...settings import BASIS_DTYPES, OGPSAArguments, OGPSAConfigError
from ...sharding import Replicated, ShardLayout
from .gradients import SetGradient, reference_gradients, sharded_reference_gradients
from .maths import (
    MODES,
    BasisBuilder,
    NonFiniteGradient,
    ProjectionStats,
    SubspaceBasis,
    basis_fingerprint,
    gradients_of,
    project_,
    project_change_,
    span_coordinates,
)
from .rotation import share_of, shares

logger = get_logger("llamafactory.ogpsa")


class GradientSpan:
    """The capability subspace (`SubspaceBasis`) and the projections onto its complement."""

    method = "gradient_span"
    # ogpsa_target=update: the log key of the norm removed from the optimizer's actual step
    step_removed_key = "update_in_span_norm"

    def __init__(self, settings: OGPSAArguments):
        if settings.ogpsa_mode not in MODES:
            raise OGPSAConfigError(f"ogpsa_mode: expected one of {MODES}, got {settings.ogpsa_mode!r}")
        self.settings = settings
        self.params: list[torch.nn.Parameter] = []
        self.layout: ShardLayout = Replicated([])
        self.basis: Optional[SubspaceBasis] = None
        # ogpsa_target=update: U theta per parameter group (one group unless ZeRO), kept by projected steps
        self._coords: dict[int, torch.Tensor] = {}
        self._stats: list[ProjectionStats] = []  # this step's projections, one per group
        self._stats_after: list[ProjectionStats] = []
        # blocks whose reference gradient was zero at a rebuild (LoRA's A while B = 0): one follow-up
        # rebuild at the next step; blocks still zero then (unused by the reference data) are left alone
        self.followup_due = False
        self._still_zero: set[int] = set()
        self._groups: tuple[Any, list] = (None, [])  # (the sets, their shares' groups): split once, reused
        # ogpsa_reference_rotation: rotated rebuilds so far; the next one reads share turn % m
        self.turn = 0
        # called on each new reference gradient before it enters the basis (None: none); a constraint that
        # composes this one with another transforms them there (`methods/composed`)
        self.row_transform: Optional[Callable[[SetGradient], None]] = None

    # ---- set-up -------------------------------------------------------------------------------
    def supports(self, layout: ShardLayout) -> Optional[str]:
        return None  # every layout `engines.detect` returns: whole parameters or pieces of them

    def setup(self, ctx: SetupContext) -> None:
        self.params, self.layout = ctx.params, ctx.layout
        low = sorted({str(t.dtype) for t in self.layout.like() if t.dtype not in (torch.float32, torch.float64)})
        if low and self.settings.ogpsa_target == "update" and ctx.is_main:
            logger.warning(
                f"ogpsa_target=update: trainable weights in {', '.join(low)} cannot resolve a step's in-span part "
                "exactly (fp32 master weights can; LLaMA-Factory keeps them unless pure_bf16 is set)"
            )

    def ready(self) -> bool:
        return self.basis is not None

    # ---- build --------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict[str, Any]:
        """Recompute reference gradients at the current weights and orthonormalise them.

        ctx.followup: this build re-measures blocks that had a zero reference gradient at the last
        one (a LoRA A while B is still 0 gets a gradient once B has taken one step)."""
        every = self.shares(ctx.refs)
        rotate = len(every) > 1 and self.basis is not None and not ctx.followup
        read = [self.turn % len(every)] if rotate else list(range(len(every)))
        sources = [g for s in read for g in every[s]]
        carry_names = None
        if rotate:
            # ogpsa_reference_rotation: the other shares' latest gradients stay, re-formed from the basis
            # (which is released parameter by parameter as they are) and committed after the new share's
            keep = [j for j, n in enumerate(self.basis.names) if share_of(n) not in read]
            carry_names = [self.basis.names[j] for j in keep]
            basis, self.basis = self.basis, None
            carry = gradients_of(basis, keep)
            del basis
            self.turn += 1
        elif self.settings.ogpsa_keep_previous and self.basis is not None and len(every) == 1:
            # ogpsa_keep_previous: the last build's own directions stay in the span. The span of the
            # reference gradients at two points contains their straight-line continuation between and
            # beyond them, which is what keeps a basis current between rebuilds (measured: docs/results.md).
            carry = self.basis.fresh_rows()
        else:
            carry = None
        self.basis = None  # the builder frees the carried rows as it copies them, the rest of the old basis now
        self._coords = {}  # coordinates in the old basis mean nothing in the new one
        name = BASIS_DTYPES[self.settings.ogpsa_basis_dtype]
        dtype = getattr(torch, name) if name else None
        builder = BasisBuilder(self.layout.like(), len(sources), self.settings.ogpsa_granularity,
                               reduce=self.layout.reduce, dtype=dtype, carry=carry, carry_names=carry_names)
        del carry
        norms, tokens = self._fill(builder, ctx, sources)
        self.layout.check_no_pending_reduction()  # no reference gradient left queued in the engine
        self.basis = builder.finish()
        spread = rank_spread(self.basis, sharded=self.layout.sharded)
        if spread != 0.0:
            logger.warning(f"ogpsa: data-parallel ranks hold different bases (spread {spread:.3e})")
        zero = {b for b, c in enumerate(self.basis.coords) if c.shape[1] == 0}
        self.followup_due, self._still_zero = followup_after(zero, self._still_zero, ctx.followup)
        if self.followup_due and ctx.is_main:
            logger.info(f"ogpsa: {len(zero)} of {len(self.basis.coords)} blocks had a zero reference gradient at "
                        f"step {ctx.step} (LoRA's A while B = 0); rebuilding at the next step")
        event = {"zero_rank_blocks": len(zero), "followup": ctx.followup}
        event.update({"rank": self.basis.rank(), **self._basis_bytes()})
        if self.basis.fresh is not None:  # directions kept from the previous build, over all blocks
            event["kept_directions"] = sum(c.shape[1] for c in self.basis.coords) - sum(self.basis.fresh)
        if len(every) > 1:  # the shares this build read (all: a build with nothing to rotate)
            event.update({"shares_read": read, "rotation_turn": self.turn})
        event.update({"params": len(self.params), "param_numel": sum(map(self.layout.full_numel, range(len(self.params))))})
        event.update({"rank_spread": spread})
        event.update({f"grad_norm/{n}": v for n, v in norms.items()})
        event.update(tokens)  # tokens/, input_tokens/, padded_tokens/<set>
        event["tokens_read"] = sum(v for k, v in tokens.items() if k.startswith("tokens/"))  # answer tokens, all sets
        return event

    def groups(self, refs: list) -> list:
        """The reference gradients' sources: the sets, or r groups of each (ogpsa_directions_per_set);
        with ogpsa_reference_rotation, every share's, share after share."""
        return [g for share in self.shares(refs) for g in share] if len(self.shares(refs)) > 1 else self.shares(refs)[0]

    def shares(self, refs: list) -> list[list]:
        """The sources per share (`rotation.shares`; one share without ogpsa_reference_rotation)."""
        if self._groups[0] is not refs:
            self._groups = (refs, shares(refs, self.settings.ogpsa_reference_rotation,
                                         self.settings.ogpsa_directions_per_set))
        return self._groups[1]

    def _fill(self, builder: BasisBuilder, ctx: BuildContext, refs: list) -> tuple[dict, dict]:
        """Run the sources `refs` through the model and commit each gradient to `builder`; return their
        gradient norms and token counts."""
        device = self.params[0].device
        layout = self.layout
        # zero-copy (autograd accumulates into the basis rows) needs whole parameters in their own dtype
        direct = not layout.sharded and all(r.dtype == p.dtype for r, p in zip(builder.next_row(), self.params))
        norms, tokens = {}, {}
        batch_size, bar = ctx.reference_pass("ogpsa rebuild", refs)  # the bar counts the groups' micro-batches
        if direct:
            grads = reference_gradients(ctx.model, self.params, refs, ctx.collator, batch_size, device,
                                        builder.next_row, bar)
        else:
            grads = sharded_reference_gradients(ctx.model, self.params, refs, ctx.collator, batch_size, device,
                                                builder.next_row, layout, bar)
        with bar:
            for g in grads:
                if self.row_transform is not None:
                    self.row_transform(g)
                try:
                    norms[g.name] = builder.commit(g.name, scale=g.scale / max(g.answer_tokens, 1))
                except NonFiniteGradient:
                    raise ReferenceDataError(
                        f"ogpsa_reference: the gradient of reference set {g.name!r} is not finite at step "
                        f"{ctx.step} (check the data and the learning rate)"
                    ) from None
                tokens[f"tokens/{g.name}"] = g.answer_tokens
                tokens[f"input_tokens/{g.name}"] = g.input_tokens
                tokens[f"padded_tokens/{g.name}"] = g.padded_tokens
        return norms, tokens

    def _basis_bytes(self) -> dict[str, int]:
        """This rank's basis bytes and, sharded, the total over ranks."""
        local = self.basis.nbytes()
        if not self.layout.sharded:
            return {"basis_bytes": local, "basis_bytes_total": local}
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.basis.ref_norms.device)
        return {"basis_bytes": local, "basis_bytes_total": int(self.layout.reduce(total).item())}

    # ---- the step -----------------------------------------------------------------------------
    def project_grad(self, group: int, measure: bool) -> None:
        """Project one parameter group's (clipped, synchronised) gradient; note U theta for the update.
        measure: also record the projected gradient's cosine with each reference gradient."""
        reduce = self.layout.reduce
        grads = self.layout.grads(group)
        self._stats.append(project_(grads, self.basis, self.settings.ogpsa_mode, reduce))
        if measure:  # measured, not assumed
            self._stats_after.append(project_(grads, self.basis, "observe", reduce))
        if self.settings.ogpsa_target == "update" and group not in self._coords:  # once per basis
            self._coords[group] = span_coordinates(self.layout.weights(group), self.basis, reduce)

    def grad_record(self) -> Optional[dict[str, float]]:
        """This step's per-group statistics merged into one record (None when the engine skipped the step)."""
        if not self._stats:
            return None
        stats = ProjectionStats.merge(self._stats)
        record = {
            "grad_norm": stats.grad_norm,
            "removed_fraction": stats.removed_fraction,
            "projected_blocks": stats.projected_blocks,
        }
        for name, cos in zip(self.basis.names, stats.cosines):
            record[f"cos/{name}"] = cos
        if self._stats_after:
            after = ProjectionStats.merge(self._stats_after)
            for name, cos in zip(self.basis.names, after.cosines):
                record[f"cos_after/{name}"] = cos
        self._stats, self._stats_after = [], []
        return record

    def project_step(self, group: int) -> float:
        """ogpsa_target=update: remove the in-span part of the step the optimizer just took; returns its
        squared norm."""
        if self.settings.ogpsa_target != "update" or group not in self._coords:
            return 0.0
        in_span, self._coords[group] = project_change_(
            self.layout.weights(group), self.basis, self._coords[group], self.settings.ogpsa_mode, self.layout.reduce
        )
        return in_span**2

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis.state_dict(), "coords": dict(self._coords), "followup_due": self.followup_due,
                "still_zero": sorted(self._still_zero), "turn": self.turn}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.basis = SubspaceBasis.from_state_dict(saved["basis"])
        self._coords = dict(saved["coords"])
        self.followup_due, self._still_zero = saved["followup_due"], set(saved["still_zero"])
        self.turn = int(saved.get("turn", 0))  # absent in files of earlier releases (no rotation)

    def reshard(self, states: list[dict], pieces: list[list[tuple[int, int]]], mine: list[tuple[int, int]],
                device) -> dict[str, Any]:
        """This rank's state from every saved rank's (`states`, each with its `pieces`): each parameter's
        basis rows are cut to this rank's piece (`mine`) from the saved pieces that cover it; the rest
        of the basis (coordinates, norms, names) is replicated. U theta of the update target is left out:
        its parameter groups belong to the saved engine, and `project_grad` notes it again from the
        restored weights, where projected steps have kept it (to round-off)."""
        first = states[0]["basis"]
        directions = []
        for i, (start, stop) in enumerate(mine):
            parts = [(p[i][0], p[i][1], s["basis"]["directions"][i]) for s, p in zip(states, pieces) if p[i][1] > p[i][0]]
            rows = first["directions"][i].shape[0]
            if stop > start:
                directions.append(checkpoint_cut(parts, start, stop).to(device).contiguous())
            else:
                directions.append(first["directions"][i].new_zeros((rows, 0), device=device))
        basis = {**first, "directions": directions, "coords": [c.to(device) for c in first["coords"]],
                 "ref_norms": first["ref_norms"].to(device)}
        return {"basis": basis, "coords": {}, "followup_due": states[0]["followup_due"],
                "still_zero": states[0]["still_zero"], "turn": states[0].get("turn", 0)}

    def identity(self) -> dict[str, Any]:
        s = self.settings
        ident = {"granularity": s.ogpsa_granularity, "basis_dtype": s.ogpsa_basis_dtype}
        if s.ogpsa_directions_per_set != 1:  # absent at the default: older checkpoints still match
            ident["directions_per_set"] = s.ogpsa_directions_per_set
        if not s.ogpsa_keep_previous:
            ident["keep_previous"] = False
        if s.ogpsa_reference_rotation != 1:
            ident["reference_rotation"] = s.ogpsa_reference_rotation
        return ident


def followup_after(zero: set[int], still_zero: set[int], followup: bool) -> tuple[bool, set[int]]:
    """(rebuild at the next step?, blocks known to stay at rank 0) after a rebuild that left the
    blocks `zero` without a direction. A follow-up records what is still zero; a scheduled rebuild
    asks for a follow-up only when a block is zero that was not zero after the last follow-up, so a
    tensor the reference data never reaches costs one extra rebuild, not one per interval."""
    if followup:
        return False, set(zero)
    return bool(zero - still_zero), still_zero


def rank_spread(basis: SubspaceBasis, sharded: bool = False) -> float:
    """Largest difference across data-parallel ranks of a fingerprint of the basis (0.0 = identical).

    The fingerprint (sums of the coordinates, reference norms and, unless each rank holds only its
    own piece of the rows, one projection of a fixed vector) is cheap and changes with any
    difference in the reference gradients or the rows. Each row is reduced in float32 without a
    float32 copy of it.
    """
    if dist.world_size() == 1:
        return 0.0
    return dist.spread(basis_fingerprint(basis, rows=not sharded).reshape(1))
