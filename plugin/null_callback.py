"""`NullSpaceCallback`: `ogpsa_method: null_space` (NSPO) inside the same trainer slots as OGPSA.

It inherits the OGPSA callback's set-up, step order, logging and checkpointing (`callback.py`) and
replaces what is method-specific:

    rebuild              forward the reference sets through the model (no backward), collect each
                         constrained layer's input covariance X^T X, keep its null space (`nullspace.py`),
                         a few inputs per pass, each covariance freed once decomposed (`activations.py`);
                         LoRA: A <- A P at once, while B = 0 (B A x then ignores the reference inputs' range)
    project              each constrained matrix's gradient G <- G P; a constrained layer's trainable
                         bias gets no gradient (the optimizer skips it: a bias moves every output)
    optimizer.step()
    project the step     ogpsa_target=update: W <- W P + W_0 (I - P), so the step the optimizer took
                         (Adam's rescaling, weight decay) lies in the null space too

Parameters outside the constrained layers (embeddings, norms, unconstrained linears) train as in a
plain run; only the constrained layers' outputs on the reference inputs are held.

Supported engines: one process and DDP (the covariances are summed over ranks, so every rank keeps
the same null spaces). ZeRO and FSDP2 are refused before launch (`engines.check_arguments`): ZeRO's
flat partitions cut a weight's rows, and W P needs whole rows; FSDP2's row shards would work but
are not wired up.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .activations import (
    ConstrainedLayer,
    constrained_layers,
    input_spaces,
    peak_bytes,
    unconstrained_weights,
)
from .callback import OGPSACallback
from .nullspace import LayerSpace, anchor, build_space, project_rows_, restore_
from .settings import OGPSAConfigError


class NullSpaceCallback(OGPSACallback):
    """Restricts each constrained linear layer's weight change to the null space of its reference inputs."""

    STEP_REMOVED_KEY = "update_in_range_norm"

    def __init__(self, settings):
        super().__init__(settings)
        self.layers: list[ConstrainedLayer] = []
        self.spaces: list[LayerSpace] = []
        self._anchors: dict[tuple[int, int], torch.Tensor] = {}  # (layer, matrix) -> W_0 (I - P), ogpsa_target=update
        self._removed_sq = self._total_sq = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.layers = constrained_layers(model, self.settings.ogpsa_null_layers)
        if not self.layers:
            raise OGPSAConfigError(
                f"ogpsa_null_layers: {self.settings.ogpsa_null_layers!r} matches no trainable linear layer of this "
                "model (try 'all_linear', or name layers as in model.named_modules(), e.g. gate_proj,down_proj)"
            )
        loose = unconstrained_weights(model, self.settings.ogpsa_null_layers, self.layers)
        if loose:
            raise OGPSAConfigError(
                f"ogpsa_null_layers: {loose[0]} ({len(loose)} such weights) is a trainable {_shape(model, loose[0])} "
                "weight of a named block that is not a linear layer (an MoE model's fused experts or router); "
                "ogpsa_method=null_space cannot constrain it and refuses MoE models whose experts or routers train: "
                "use LoRA on the linear layers (experts frozen) or ogpsa_method: gradient_span"
            )
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)

    # ---- rebuild ----------------------------------------------------------------------------
    def rebuild(self, args, state, model, followup: bool = False) -> None:
        start = time.perf_counter()
        self._check_lora_b(state)
        self.spaces, self._anchors = [], {}  # free the old spaces before the covariances are made
        self.spaces, tokens, plan = self._collect(args, state, model)
        moved = self._constrain_lora()
        self.built_at_step = state.global_step
        self.rebuilds += 1
        seconds = time.perf_counter() - start
        self._pending["rebuild_seconds"].append(seconds)
        self._last_rebuild = self._rebuild_event(args, state, seconds, moved, tokens)
        # the forward passes it took, and the bound on what it held at once (`activations.peak_bytes`)
        self._last_rebuild.update({"passes": len(plan.passes),
                                   "peak_bytes_bound": peak_bytes(plan, [sp.nbytes() for sp in self.spaces])})
        self._write(self._last_rebuild)

    def _collect(self, args, state, model):
        batch_size, bar = self._reference_pass(args, state, "ogpsa null space")
        alpha = self.settings.ogpsa_null_alpha

        def decompose(cov):  # each covariance is freed as soon as its float64 copy exists
            return build_space(cov, alpha, free_input=True)

        with bar:
            return input_spaces(model, self.layers, self.refs, self.collator, batch_size, self.params[0].device,
                                decompose, bar, even=self.layout.collective_forward)

    def _constrain_lora(self) -> float:
        """LoRA: A <- A P, so B A x = 0 on the reference inputs' range whatever B becomes; returns the
        norm removed (PEFT's random A has a part in that range, so it is > 0 at a stage's start).

        Only while B = 0 (a fresh adapter): once B has moved, A <- A P would change B A x, the model's
        function, on every input A's removed part reaches. A rebuild then (a resume whose checkpoint
        has no usable null space, an adapter trained before this stage) is refused (`_check_lora_b`)."""
        removed_sq = 0.0
        for layer in self.layers:
            if not _is_lora(layer):
                continue
            for a in layer.matrices:
                with torch.no_grad():
                    removed_sq += project_rows_(a.data, self.spaces[layer.space]) ** 2
        return removed_sq**0.5

    def _check_lora_b(self, state) -> None:
        for layer in self.layers:
            if _is_lora(layer) and _lora_b_moved(layer):
                raise OGPSAConfigError(
                    f"ogpsa_method=null_space: {layer.name}'s LoRA B is not zero at step {state.global_step} (a "
                    "trained adapter, or one not initialised with B = 0), and A <- A P would change the model's "
                    "function; start from a fresh adapter or resume from a checkpoint of this run that holds its "
                    "null space"
                )

    def _rebuild_event(self, args, state, seconds: float, moved: float, tokens: dict) -> dict[str, Any]:
        event = {"event": "rebuild", "method": "null_space", "step": state.global_step, "seconds": round(seconds, 4)}
        event.update({"layers": len(self.layers), "spaces": len(self.spaces), "lora_a_moved": moved})
        event.update({"world_size": args.world_size, "engine": self.layout.engine})
        event.update({"basis_bytes": sum(s.nbytes() for s in self.spaces)})
        dims = [s.dim for s in self.spaces]
        nulls = [s.null_dim for s in self.spaces]
        event.update({"null_dims": sum(nulls), "input_dims": sum(dims),
                      "null_fraction": sum(nulls) / max(sum(dims), 1)})
        # per layer: the null dimension, the fraction of its input energy still reachable, and the bytes
        # of its (possibly shared) stored basis
        for layer in self.layers:
            space = self.spaces[layer.space]
            event[f"null_dim/{layer.name}"] = space.null_dim
            event[f"null_energy/{layer.name}"] = space.null_energy
            event[f"basis_bytes/{layer.name}"] = space.nbytes()
        for name, t in tokens.items():
            event[f"input_tokens/{name}"] = t["input"]
            event[f"padded_tokens/{name}"] = t["padded"]
        return event

    # ---- the step ---------------------------------------------------------------------------
    def _project_group(self, group: int) -> None:
        """G <- G P for every constrained matrix; trainable biases of constrained layers get no step."""
        removed_sq = total_sq = 0.0
        with torch.no_grad():
            for layer in self.layers:
                space = self.spaces[layer.space]
                for m in layer.matrices:
                    if m.grad is None:
                        continue
                    total_sq += float(m.grad.float().norm()) ** 2
                    removed_sq += project_rows_(m.grad, space) ** 2
                for b in layer.frozen:
                    b.grad = None  # torch optimizers skip a parameter without a gradient (no decay either)
        self._removed_sq, self._total_sq = removed_sq, total_sq
        if self.settings.ogpsa_target == "update" and not self._anchors:  # once per null space
            self._anchors = {(i, j): anchor(m, self.spaces[layer.space])
                             for i, layer in enumerate(self.layers) for j, m in enumerate(layer.matrices)}

    def _project_group_step(self, group: int) -> None:
        """ogpsa_target=update: take the part of the optimizer's step outside the null space back out."""
        if self.settings.ogpsa_target != "update" or not self._anchors:
            return
        removed_sq = 0.0
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for j, m in enumerate(layer.matrices):
                    removed_sq += restore_(m, self.spaces[layer.space], self._anchors[(i, j)]) ** 2
        self._in_span_sq += removed_sq

    def _finish_gradient(self, state) -> None:
        total = self._total_sq**0.5
        record = {"step": state.global_step + 1, "grad_norm": total,
                  "removed_fraction": (self._removed_sq**0.5) / total if total > 0 else 0.0}
        for key, value in record.items():
            if key != "step":
                self._pending[key].append(float(value))
        self._step_record = record

    # ---- checkpoint -------------------------------------------------------------------------
    def _has_basis(self) -> bool:
        return bool(self.spaces)

    def _payload(self) -> dict[str, Any]:
        return {"spaces": [s.state_dict() for s in self.spaces], "layer_spaces": [la.space for la in self.layers],
                "anchors": {f"{i}.{j}": t for (i, j), t in self._anchors.items()}}

    def _apply_payload(self, saved: dict[str, Any]) -> None:
        self.spaces = [LayerSpace.from_state_dict(s) for s in saved["spaces"]]
        for layer, space in zip(self.layers, saved["layer_spaces"]):
            layer.space = int(space)
        self._anchors = {tuple(int(x) for x in k.split(".")): t for k, t in saved["anchors"].items()}

    def _method_identity(self) -> dict[str, Any]:
        return {"layers": [la.name for la in self.layers], "null_alpha": self.settings.ogpsa_null_alpha}

def _is_lora(layer: ConstrainedLayer) -> bool:
    return hasattr(layer.module, "lora_A")


def _lora_b_moved(layer: ConstrainedLayer) -> bool:
    """Whether any LoRA B of the layer is non-zero (PEFT starts B at exactly zero)."""
    lora_b = getattr(layer.module, "lora_B", None)
    if not isinstance(lora_b, torch.nn.ModuleDict):
        return False
    return any(bool(m.weight.detach().ne(0).any()) for m in lora_b.values() if getattr(m, "weight", None) is not None)


def _shape(model: torch.nn.Module, name: str) -> str:
    return "x".join(str(n) for n in model.get_parameter(name).shape)
