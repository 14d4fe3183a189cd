"""`ogpsa_method: null_space` (NSPO): the constraint that restricts each constrained linear layer's
weight change to the null space of its inputs on the reference sets (the maths is `maths.py`,
the inputs `activations.py`).

    build                forward the reference sets through the model (no backward), collect each
                         constrained layer's input covariance X^T X, keep its null space (`maths.py`),
                         a few inputs per pass, each covariance freed once decomposed (`activations.py`);
                         LoRA: A <- A P at once, while B = 0 (B A x then ignores the reference inputs' range);
                         a trained adapter (B moved: a rebuild, a resume without the saved state) keeps
                         its B A, and its B gets the rank-space directions it may still move in
                         (`maths.adapter_space`)
    project_grad         each constrained matrix's gradient G <- G P (a trained adapter's B: onto its
                         free directions); a constrained layer's trainable bias gets no gradient (the
                         optimizer skips it: a bias moves every output)
    project_step         ogpsa_target=update: W <- W P + W_0 (I - P), so the step the optimizer took
                         (Adam's rescaling, weight decay) lies in the null space too

Parameters outside the constrained layers (embeddings, norms, unconstrained linears) train as in a
plain run; only the constrained layers' outputs on the reference inputs are held.

Supported engines: one process, DDP, FSDP2 and ZeRO-1/2/3. The covariances are summed over ranks, so
every rank keeps the same null spaces (replicated: a d_in x k basis per input, not per weight). (W P)'s
rows are W's rows times P. FSDP2 shards each weight by rows (dim 0): each rank projects its own rows of
the weight, its gradient and its anchor with no communication. ZeRO's flat partitions cut rows anywhere:
each rank projects the rows its piece holds whole, and the rows a boundary cuts (at most one at each
end of a piece) are summed over the ranks into whole rows, projected whole by every rank alike, and
each rank takes its part back (`maths.RowCut`; every rank enters those sums with the same shapes,
including a rank that holds none of the matrix). The ZeRO step hook calls this per optimizer group,
on the float32 master partition, as for the gradient span.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ... import dist
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
from .maths import (
    LayerSpace,
    RowCut,
    adapter_space,
    anchor,
    anchor_piece,
    build_space,
    project_piece_,
    project_rows_,
    restore_,
    restore_piece_,
    split_rows,
)


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
        # trained adapters at the last build: (layer, matrix) -> the rank-space directions its B may move in
        # (`maths.adapter_space`), and B_0 (I - Q Q^T) for the update target
        self.b_spaces: dict[tuple[int, int], LayerSpace] = {}
        self._b_anchors: dict[tuple[int, int], torch.Tensor] = {}
        self._removed_sq = self._total_sq = 0.0
        # ZeRO's flat partitions: parameter -> its index in `params`, and each projected matrix's `RowCut`
        self._index: dict[int, int] = {}
        self._cuts: Optional[dict[int, RowCut]] = None
        self._biases: dict[int, Optional[torch.Tensor]] = {}  # ZeRO: frozen biases' master pieces, put back per step

    # ---- set-up -------------------------------------------------------------------------------
    def supports(self, layout: ShardLayout) -> Optional[str]:
        return None  # whole rows (one process, DDP), row shards (FSDP2), or flat pieces cut anywhere (ZeRO)

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
        self._index = {id(p): k for k, p in enumerate(self.params)}
        if self.layout.steps_inside_engine:  # ZeRO: pieces cut rows anywhere
            self._cuts = self._row_cuts()

    def _row_cuts(self) -> dict[int, RowCut]:
        """Each projected matrix's `RowCut` (its LoRA B's too), from every rank's pieces (one all-gather at
        set-up, entered by every rank)."""
        pieces = torch.tensor([[self.layout.piece(k).start, self.layout.piece(k).stop] for k in range(len(self.params))],
                              dtype=torch.int64, device=self.params[0].device)
        every = [t.tolist() for t in dist.all_gather(pieces)]
        mats = [m for layer in self.layers for m in layer.matrices]
        mats += [_lora_b(layer, j) for layer in self.layers if _is_lora(layer) for j in range(len(layer.matrices))]
        cuts = {}
        for m in mats:
            k = self._index[id(m)]
            d = int(getattr(m, "ds_shape", m.shape)[-1])
            piece = self.layout.piece(k)
            cuts[k] = RowCut(d, piece.start, piece.stop, split_rows([tuple(e[k]) for e in every], d))
        return cuts

    def ready(self) -> bool:
        return bool(self.spaces)

    # ---- build --------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict[str, Any]:
        trained = self.trained_adapters()
        self.spaces, self._anchors, self.b_spaces, self._b_anchors = [], {}, {}, {}  # free the old state first
        self.spaces, tokens, plan, grams = self._collect(ctx, trained)
        moved = self._constrain_lora(trained)
        self.b_spaces = {key: adapter_space(gram, rows, self.spaces[self.layers[key[0]].space].threshold)
                         for key, (gram, rows) in grams.items()}
        event = self._build_event(moved, tokens)
        # the forward passes it took, and the bound on what it held at once (`activations.peak_bytes`)
        event.update({"passes": len(plan.passes),
                      "peak_bytes_bound": peak_bytes(plan, [sp.nbytes() for sp in self.spaces])})
        if self._cuts is not None:  # ZeRO: rows the partitions cut, projected whole after a sum over ranks
            event["split_rows"] = sum(len(c.split) for c in self._cuts.values())
        if grams:  # trained adapters: the rank-space directions their B may still move in (`adapter_space`)
            event.update({"lora_trained_layers": len(trained), "lora_b_free_dims": sum(
                sp.null_dim for sp in self.b_spaces.values()), "lora_b_dims": sum(sp.dim for sp in self.b_spaces.values())})
        return event

    def _collect(self, ctx: BuildContext, trained: set[int]):
        """The null spaces; for the trained adapters' layers (`trained`), also A C A^T and A A^T of each A,
        taken from the covariance C before it is freed (A whole: gathered under FSDP2, every rank alike)."""
        batch_size, bar = ctx.reference_pass("ogpsa null space")
        alpha, energy = self.settings.ogpsa_null_alpha, self.settings.ogpsa_null_energy
        grams: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        order = iter(range(len(self.layers) + 1))  # input_spaces decomposes the spaces in order 0, 1, ...

        def decompose(cov):  # each covariance is freed as soon as its float64 copy exists
            space = next(order)
            for i in sorted(trained):
                if self.layers[i].space == space:
                    for j, a in enumerate(self.layers[i].matrices):
                        whole = _whole(a).detach().float()
                        grams[(i, j)] = ((whole @ cov) @ whole.T, whole @ whole.T)
            return build_space(cov, alpha, free_input=True, energy=energy)

        with bar:
            spaces, tokens, plan = input_spaces(ctx.model, self.layers, ctx.refs, ctx.collator, batch_size,
                                                self.params[0].device, decompose, bar,
                                                even=self.layout.collective_forward)
        return spaces, tokens, plan, grams

    def _constrain_lora(self, trained: set[int]) -> float:
        """LoRA with B = 0 (a fresh adapter): A <- A P, so B A x = 0 on the reference inputs' range whatever
        B becomes; returns the norm removed (PEFT's random A has a part in that range, so it is > 0 at a
        stage's start).

        Not for a trained adapter (`trained`: B has moved, at a scheduled rebuild, a resume without a saved
        null space, or an adapter trained before this stage): A <- A P would change B A x, the model's
        function. Its B A is kept as it is instead, and only its later changes are constrained: A's
        gradient onto the new null space, B's onto the rank-space directions A does not carry into the
        reference inputs' range (`maths.adapter_space`, `project_grad`)."""
        removed_sq = 0.0
        for i, layer in enumerate(self.layers):
            if not _is_lora(layer) or i in trained:
                continue
            for a in layer.matrices:
                with torch.no_grad():
                    if self._cuts is None:
                        removed_sq += project_rows_(_local(a), self.spaces[layer.space]) ** 2
                    else:
                        removed_sq += self._constrain_zero(a, self.spaces[layer.space])
        if self.layout.sharded:  # each rank moved its own rows of A: the norm is over all of them
            total = torch.tensor([removed_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq = float(self.layout.reduce(total).item())
        return removed_sq**0.5

    def _constrain_zero(self, a: torch.nn.Parameter, space: LayerSpace) -> float:
        """A <- A P under ZeRO: on this rank's piece of the float32 master and on the weights the forward
        reads (ZeRO-1/2: the whole bit16 parameter; ZeRO-3: this rank's bit16 piece)."""
        k, device = self._index[id(a)], self.params[0].device
        cut = self._cuts[k]
        master = self.layout.weights(self.layout.group_of(k))[k]
        removed = project_piece_(master, cut, space, self.layout.reduce, device)
        if hasattr(a, "ds_tensor"):
            held = a.ds_tensor.view(-1)[: cut.stop - cut.start] if cut.stop > cut.start else None
            project_piece_(held, cut, space, self.layout.reduce, device)
            if a.data.numel() == a.ds_numel:  # a persistent parameter (below stage3_param_persistence_threshold):
                project_rows_(a.data.view(-1, cut.d), space)  # the forward reads its whole copy, not the pieces
        else:
            project_rows_(a.data.view(-1, cut.d), space)
        return removed

    def trained_adapters(self) -> set[int]:
        """The constrained layers whose LoRA B is not zero (every rank agrees: one sum over the ranks'
        rows of B when sharded)."""
        moved = torch.tensor([float(_is_lora(layer) and _lora_b_moved(layer)) for layer in self.layers],
                             dtype=torch.float64, device=self.params[0].device)
        if self.layout.sharded:  # each rank sees its rows of B: one sum, entered by every rank
            self.layout.reduce(moved)
        return {i for i, flag in enumerate(moved.tolist()) if flag > 0}

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
    def _targets(self):
        """(anchors dict, key, parameter, space) of every projected matrix: each constrained weight or
        LoRA A with its layer's null space, each trained adapter's B with its rank-space directions."""
        for i, layer in enumerate(self.layers):
            for j, m in enumerate(layer.matrices):
                yield self._anchors, (i, j), m, self.spaces[layer.space]
        for (i, j), space in self.b_spaces.items():
            yield self._b_anchors, (i, j), _lora_b(self.layers[i], j), space

    def project_grad(self, group: int, measure: bool) -> None:
        """G <- G P for every constrained matrix (a trained adapter's B: onto its free directions);
        trainable biases of constrained layers get no step. Under ZeRO, once per optimizer group, on the
        group's pieces of the float32 gradient partition."""
        if self._cuts is not None:
            self._project_grad_zero(group)
        else:
            removed_sq = total_sq = 0.0
            with torch.no_grad():
                for _, _, m, space in self._targets():
                    if m.grad is None:
                        continue
                    grad = _local(m.grad)  # FSDP2: this rank's rows, projected with the whole P
                    total_sq += float(grad.float().norm()) ** 2
                    removed_sq += project_rows_(grad, space) ** 2
                for layer in self.layers:
                    for b in layer.frozen:
                        b.grad = None  # torch optimizers skip a parameter without a gradient (no decay either)
            self._add_norms(removed_sq, total_sq)
        if self.settings.ogpsa_target == "update" and not self._anchors:  # once per null space
            for anchors, key, m, space in list(self._targets()):
                anchors[key] = self._anchor(m, space)

    def _project_grad_zero(self, group: int) -> None:
        layout, device = self.layout, self.params[0].device
        grads = layout.grads(group)
        removed_sq = total_sq = 0.0
        with torch.no_grad():
            for _, _, m, space in self._targets():
                k = self._index[id(m)]
                if layout.group_of(k) != group:
                    continue
                flat = grads[k]
                if flat is not None:
                    total_sq += float(flat.float().norm()) ** 2
                removed_sq += project_piece_(flat, self._cuts[k], space, layout.reduce, device)
            # a bias a ZeRO group holds cannot be skipped by its optimizer: no gradient, and its value put
            # back after the step (weight decay would move it)
            weights = layout.weights(group)
            for layer in self.layers:
                for b in layer.frozen:
                    k = self._index[id(b)]
                    if layout.group_of(k) == group and grads[k] is not None:
                        grads[k].zero_()
                        self._biases.setdefault(k, weights[k].detach().clone())
        self._add_norms(removed_sq, total_sq)

    def _add_norms(self, removed_sq: float, total_sq: float) -> None:
        if self.layout.sharded:  # the norms over every rank's rows (one two-number sum per call)
            sums = torch.tensor([removed_sq, total_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq, total_sq = self.layout.reduce(sums).tolist()
        self._removed_sq += removed_sq
        self._total_sq += total_sq

    def _anchor(self, m: torch.nn.Parameter, space: LayerSpace):
        if self._cuts is None:
            return anchor(_local(m), space)
        k = self._index[id(m)]
        flat = self.layout.weights(self.layout.group_of(k))[k]
        return anchor_piece(flat, self._cuts[k], space, self.layout.reduce, self.params[0].device)

    def grad_record(self) -> Optional[dict[str, float]]:
        total = self._total_sq**0.5
        record = {"grad_norm": total, "removed_fraction": (self._removed_sq**0.5) / total if total > 0 else 0.0}
        self._removed_sq = self._total_sq = 0.0
        return record

    def project_step(self, group: int) -> float:
        """ogpsa_target=update: take the part of the optimizer's step outside the null space back out;
        returns its squared norm."""
        if self._cuts is not None:
            self._put_back_biases(group)
        if self.settings.ogpsa_target != "update" or not self._anchors:
            return 0.0
        removed_sq = 0.0
        layout, device = self.layout, self.params[0].device
        weights = layout.weights(group) if self._cuts is not None else None
        with torch.no_grad():
            for anchors, key, m, space in self._targets():
                if self._cuts is None:
                    removed_sq += restore_(_local(m), space, anchors[key]) ** 2
                    continue
                k = self._index[id(m)]
                if layout.group_of(k) == group:
                    removed_sq += restore_piece_(weights[k], self._cuts[k], space, anchors[key], layout.reduce, device)
        if self.layout.sharded:  # over every rank's rows
            total = torch.tensor([removed_sq], dtype=torch.float64, device=self.params[0].device)
            removed_sq = float(self.layout.reduce(total).item())
        return removed_sq

    def _put_back_biases(self, group: int) -> None:
        weights = self.layout.weights(group)
        with torch.no_grad():
            for k, kept in self._biases.items():
                if self.layout.group_of(k) == group and weights[k] is not None:
                    weights[k].copy_(kept)

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"spaces": [s.state_dict() for s in self.spaces], "layer_spaces": [la.space for la in self.layers],
                "anchors": {f"{i}.{j}": t for (i, j), t in self._anchors.items()},
                "b_spaces": {f"{i}.{j}": s.state_dict() for (i, j), s in self.b_spaces.items()},
                "b_anchors": {f"{i}.{j}": t for (i, j), t in self._b_anchors.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.spaces = [LayerSpace.from_state_dict(s) for s in saved["spaces"]]
        for layer, space in zip(self.layers, saved["layer_spaces"]):
            layer.space = int(space)
        key = lambda k: tuple(int(x) for x in k.split("."))  # noqa: E731
        self._anchors = {key(k): t for k, t in saved["anchors"].items()}
        self.b_spaces = {key(k): LayerSpace.from_state_dict(s) for k, s in saved.get("b_spaces", {}).items()}
        self._b_anchors = {key(k): t for k, t in saved.get("b_anchors", {}).items()}

    def reshard(self, states: list[dict], pieces: list[list[tuple[int, int]]], mine: list[tuple[int, int]],
                device) -> dict[str, Any]:
        """This rank's state from every saved rank's: the null spaces are replicated (every rank builds
        the same ones), so rank 0's are taken. The anchors W_0 (I - P) are left out: they are rows of the
        saved engine's pieces, and `project_grad` takes them again from the restored weights, whose part
        outside the null space every restored step has kept at W_0 (I - P) (to round-off)."""
        first = states[0]
        spaces = [{**sp, "vectors": sp["vectors"].to(device).contiguous()} for sp in first["spaces"]]
        b_spaces = {k: {**sp, "vectors": sp["vectors"].to(device).contiguous()}
                    for k, sp in first.get("b_spaces", {}).items()}
        return {"spaces": spaces, "layer_spaces": list(first["layer_spaces"]), "anchors": {}, "b_spaces": b_spaces,
                "b_anchors": {}}

    def identity(self) -> dict[str, Any]:
        ident = {"layers": [la.name for la in self.layers], "null_alpha": self.settings.ogpsa_null_alpha}
        if self.settings.ogpsa_null_energy is not None:  # absent when unset: older checkpoints still match
            ident["null_energy"] = self.settings.ogpsa_null_energy
        return ident


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a parameter or gradient: the local shard of an FSDP2 DTensor (sharded on dim 0,
    so whole rows), the tensor itself otherwise (ZeRO-3: this rank's flat piece, for reading). In-place
    changes to it are changes to the parameter."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    local = getattr(t, "_local_tensor", None)
    return t.data if local is None and isinstance(t, torch.nn.Parameter) else t if local is None else local


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: an FSDP2 DTensor or a ZeRO-3 parameter gathered (a collective:
    every rank calls it for the same parameters in the same order), the tensor itself otherwise."""
    if hasattr(t, "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_b(layer: ConstrainedLayer, j: int) -> torch.nn.Parameter:
    """The B paired with the layer's j-th constrained A (the same adapter name)."""
    names = [name for name, m in layer.module.lora_A.items()
             if any(m.weight is a for a in layer.matrices)]
    return layer.module.lora_B[names[j]].weight


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
