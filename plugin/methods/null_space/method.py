"""`ogpsa_method: null_space` (NSPO): the constraint that restricts each constrained linear layer's
weight change to the null space of its inputs on the reference sets (the maths is `maths.py`,
the inputs `activations.py`).

    build                forward the reference sets through the model (no backward), collect each
                         constrained layer's input covariance X^T X, keep its null space (`maths.py`),
                         a few inputs per pass, each covariance freed once decomposed (`activations.py`);
                         LoRA: A <- A P at once, while B = 0 (B A x then ignores the reference inputs' range)
    project_grad         each constrained matrix's gradient G <- G P; a constrained layer's trainable
                         bias gets no gradient (the optimizer skips it: a bias moves every output)
    project_step         ogpsa_target=update: W <- W P + W_0 (I - P), so the step the optimizer took
                         (Adam's rescaling, weight decay) lies in the null space too

Parameters outside the constrained layers (embeddings, norms, unconstrained linears) train as in a
plain run; only the constrained layers' outputs on the reference inputs are held.

Supported engines: one process, DDP and FSDP2. The covariances are summed over ranks, so every rank
keeps the same null spaces (replicated: a d_in x k basis per input, not per weight). FSDP2 shards
each weight by rows (dim 0), and (W P)'s rows are W's rows times P: each rank projects its own rows
of the weight, its gradient and its anchor with no communication. ZeRO is refused before launch
(`engines.check_arguments`): its flat partitions cut a weight's rows, and W P needs whole rows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...constraint import BuildContext, SetupContext
from ...settings import OGPSAArguments, OGPSAConfigError
from ...sharding import Replicated, ShardLayout
from .activations import (
    ConstrainedLayer,
    constrained_layers,
    input_spaces,
    peak_bytes,
    unconstrained_weights,
)
from .maths import LayerSpace, anchor, build_space, project_rows_, restore_


class NullSpace:
    """One `LayerSpace` per distinct input of the constrained layers, and the projections onto them."""

    method = "null_space"
    step_removed_key = "update_in_range_norm"
    followup_due = False  # a build needs no second look: covariances exist from the first batch

    def __init__(self, settings: OGPSAArguments):
        self.settings = settings
        self.params: list[torch.nn.Parameter] = []
        self.layout: ShardLayout = Replicated([])
        self.layers: list[ConstrainedLayer] = []
        self.spaces: list[LayerSpace] = []
        self._anchors: dict[tuple[int, int], torch.Tensor] = {}  # (layer, matrix) -> W_0 (I - P), ogpsa_target=update
        self._removed_sq = self._total_sq = 0.0

    # ---- set-up -------------------------------------------------------------------------------
    def supports(self, layout: ShardLayout) -> Optional[str]:
        if layout.engine.startswith("zero"):
            return f"{layout.engine}: ogpsa_method=null_space runs on one process, DDP or FSDP2"
        return None

    def setup(self, ctx: SetupContext) -> None:
        self.params, self.layout = ctx.params, ctx.layout
        self.layers = constrained_layers(ctx.model, self.settings.ogpsa_null_layers)
        if not self.layers:
            raise OGPSAConfigError(
                f"ogpsa_null_layers: {self.settings.ogpsa_null_layers!r} matches no trainable linear layer of this "
                "model (try 'all_linear', or name layers as in model.named_modules(), e.g. gate_proj,down_proj)"
            )
        loose = unconstrained_weights(ctx.model, self.settings.ogpsa_null_layers, self.layers)
        if loose:
            raise OGPSAConfigError(
                f"ogpsa_null_layers: {loose[0]} ({len(loose)} such weights) is a trainable "
                f"{_shape(ctx.model, loose[0])} weight of a named block that is not a linear layer (an MoE model's "
                "fused experts or router); ogpsa_method=null_space cannot constrain it and refuses MoE models whose "
                "experts or routers train: use LoRA on the linear layers (experts frozen) or ogpsa_method: "
                "gradient_span"
            )

    def ready(self) -> bool:
        return bool(self.spaces)

    # ---- build --------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict[str, Any]:
        self.check_lora_b(ctx.step)
        self.spaces, self._anchors = [], {}  # free the old spaces before the covariances are made
        self.spaces, tokens, plan = self._collect(ctx)
        moved = self._constrain_lora()
        event = self._build_event(moved, tokens)
        # the forward passes it took, and the bound on what it held at once (`activations.peak_bytes`)
        event.update({"passes": len(plan.passes),
                      "peak_bytes_bound": peak_bytes(plan, [sp.nbytes() for sp in self.spaces])})
        return event

    def _collect(self, ctx: BuildContext):
        batch_size, bar = ctx.reference_pass("ogpsa null space")
        alpha, energy = self.settings.ogpsa_null_alpha, self.settings.ogpsa_null_energy

        def decompose(cov):  # each covariance is freed as soon as its float64 copy exists
            return build_space(cov, alpha, free_input=True, energy=energy)

        with bar:
            return input_spaces(ctx.model, self.layers, ctx.refs, ctx.collator, batch_size, self.params[0].device,
                                decompose, bar, even=self.layout.collective_forward)

    def _constrain_lora(self) -> float:
        """LoRA: A <- A P, so B A x = 0 on the reference inputs' range whatever B becomes; returns the
        norm removed (PEFT's random A has a part in that range, so it is > 0 at a stage's start).

        Only while B = 0 (a fresh adapter): once B has moved, A <- A P would change B A x, the model's
        function, on every input A's removed part reaches. A rebuild then (a resume whose checkpoint
        has no usable null space, an adapter trained before this stage) is refused (`check_lora_b`)."""
        removed_sq = 0.0
        for layer in self.layers:
            if not _is_lora(layer):
                continue
            for a in layer.matrices:
                with torch.no_grad():
                    removed_sq += project_rows_(_local(a), self.spaces[layer.space]) ** 2
        if self.layout.sharded:  # each rank moved its own rows of A: the norm is over all of them
            total = torch.tensor([removed_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq = float(self.layout.reduce(total).item())
        return removed_sq**0.5

    def check_lora_b(self, step: int) -> None:
        """Refuse a build that would move a trained LoRA (see `_constrain_lora`)."""
        moved = torch.tensor([float(_is_lora(layer) and _lora_b_moved(layer)) for layer in self.layers],
                             dtype=torch.float64, device=self.params[0].device)
        if self.layout.sharded:  # each rank sees its rows of B: one sum, entered by every rank
            self.layout.reduce(moved)
        for layer, flag in zip(self.layers, moved.tolist()):
            if flag > 0:
                raise OGPSAConfigError(
                    f"ogpsa_method=null_space: {layer.name}'s LoRA B is not zero at step {step} (a "
                    "trained adapter, or one not initialised with B = 0), and A <- A P would change the model's "
                    "function; start from a fresh adapter or resume from a checkpoint of this run that holds its "
                    "null space"
                )

    def _build_event(self, moved: float, tokens: dict) -> dict[str, Any]:
        event: dict[str, Any] = {"method": "null_space"}
        event.update({"layers": len(self.layers), "spaces": len(self.spaces), "lora_a_moved": moved})
        event.update({"basis_bytes": sum(s.nbytes() for s in self.spaces)})
        dims = [s.dim for s in self.spaces]
        nulls = [s.null_dim for s in self.spaces]
        event.update({"null_dims": sum(nulls), "input_dims": sum(dims),
                      "null_fraction": sum(nulls) / max(sum(dims), 1)})
        # per layer: the null dimension, the fraction of its input energy still reachable, the directions
        # protected and the energy they hold (what ogpsa_null_energy asks for), and the bytes of its
        # (possibly shared) stored basis
        for layer in self.layers:
            space = self.spaces[layer.space]
            event[f"null_dim/{layer.name}"] = space.null_dim
            event[f"null_energy/{layer.name}"] = space.null_energy
            event[f"protected_dim/{layer.name}"] = space.dim - space.null_dim
            event[f"protected_energy/{layer.name}"] = 1.0 - space.null_energy if space.largest > 0 else 0.0
            event[f"basis_bytes/{layer.name}"] = space.nbytes()
        for name, t in tokens.items():
            event[f"input_tokens/{name}"] = t["input"]
            event[f"padded_tokens/{name}"] = t["padded"]
        return event

    # ---- the step -----------------------------------------------------------------------------
    def project_grad(self, group: int, measure: bool) -> None:
        """G <- G P for every constrained matrix; trainable biases of constrained layers get no step."""
        removed_sq = total_sq = 0.0
        with torch.no_grad():
            for layer in self.layers:
                space = self.spaces[layer.space]
                for m in layer.matrices:
                    if m.grad is None:
                        continue
                    grad = _local(m.grad)  # FSDP2: this rank's rows, projected with the whole P
                    total_sq += float(grad.float().norm()) ** 2
                    removed_sq += project_rows_(grad, space) ** 2
                for b in layer.frozen:
                    b.grad = None  # torch optimizers skip a parameter without a gradient (no decay either)
        if self.layout.sharded:  # the norms over every rank's rows (one two-number sum per step)
            sums = torch.tensor([removed_sq, total_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq, total_sq = self.layout.reduce(sums).tolist()
        self._removed_sq, self._total_sq = removed_sq, total_sq
        if self.settings.ogpsa_target == "update" and not self._anchors:  # once per null space
            self._anchors = {(i, j): anchor(_local(m), self.spaces[layer.space])
                             for i, layer in enumerate(self.layers) for j, m in enumerate(layer.matrices)}

    def grad_record(self) -> Optional[dict[str, float]]:
        total = self._total_sq**0.5
        return {"grad_norm": total, "removed_fraction": (self._removed_sq**0.5) / total if total > 0 else 0.0}

    def project_step(self, group: int) -> float:
        """ogpsa_target=update: take the part of the optimizer's step outside the null space back out;
        returns its squared norm."""
        if self.settings.ogpsa_target != "update" or not self._anchors:
            return 0.0
        removed_sq = 0.0
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for j, m in enumerate(layer.matrices):
                    removed_sq += restore_(_local(m), self.spaces[layer.space], self._anchors[(i, j)]) ** 2
        if self.layout.sharded:  # over every rank's rows
            total = torch.tensor([removed_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq = float(self.layout.reduce(total).item())
        return removed_sq

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"spaces": [s.state_dict() for s in self.spaces], "layer_spaces": [la.space for la in self.layers],
                "anchors": {f"{i}.{j}": t for (i, j), t in self._anchors.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.spaces = [LayerSpace.from_state_dict(s) for s in saved["spaces"]]
        for layer, space in zip(self.layers, saved["layer_spaces"]):
            layer.space = int(space)
        self._anchors = {tuple(int(x) for x in k.split(".")): t for k, t in saved["anchors"].items()}

    def reshard(self, states: list[dict], pieces: list[list[tuple[int, int]]], mine: list[tuple[int, int]],
                device) -> dict[str, Any]:
        """This rank's state from every saved rank's: the null spaces are replicated (every rank builds
        the same ones), so rank 0's are taken. The anchors W_0 (I - P) are left out: they are rows of the
        saved engine's pieces, and `project_grad` takes them again from the restored weights, whose part
        outside the null space every restored step has kept at W_0 (I - P) (to round-off)."""
        first = states[0]
        spaces = [{**sp, "vectors": sp["vectors"].to(device).contiguous()} for sp in first["spaces"]]
        return {"spaces": spaces, "layer_spaces": list(first["layer_spaces"]), "anchors": {}}

    def identity(self) -> dict[str, Any]:
        ident = {"layers": [la.name for la in self.layers], "null_alpha": self.settings.ogpsa_null_alpha}
        if self.settings.ogpsa_null_energy is not None:  # absent when unset: older checkpoints still match
            ident["null_energy"] = self.settings.ogpsa_null_energy
        return ident


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a parameter or gradient: the local shard of an FSDP2 DTensor (sharded on dim 0,
    so whole rows), the tensor itself otherwise. In-place changes to it are changes to the parameter."""
    local = getattr(t, "_local_tensor", None)
    return t.data if local is None and isinstance(t, torch.nn.Parameter) else t if local is None else local


def _is_lora(layer: ConstrainedLayer) -> bool:
    return hasattr(layer.module, "lora_A")


def _lora_b_moved(layer: ConstrainedLayer) -> bool:
    """Whether any LoRA B of the layer is non-zero (PEFT starts B at exactly zero)."""
    lora_b = getattr(layer.module, "lora_B", None)
    if not isinstance(lora_b, torch.nn.ModuleDict):
        return False
    return any(bool(_local(m.weight).detach().ne(0).any()) for m in lora_b.values()
               if getattr(m, "weight", None) is not None)


def _shape(model: torch.nn.Module, name: str) -> str:
    return "x".join(str(n) for n in model.get_parameter(name).shape)
