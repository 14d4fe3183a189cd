"""The null-space method's data: which linear layers it constrains, and their inputs' covariances.

`constrained_layers` picks the layers (`ogpsa_null_layers`) and the trainable matrix of each that
the constraint acts on: the weight under full and freeze fine-tuning, each adapter's A under LoRA.
`input_covariances` runs the reference sets forward once (no backward) with forward hooks on those
layers and accumulates, per distinct input, the uncentred covariance X^T X of the non-padding
positions in float32, summed over data-parallel ranks. Layers that read the same tensor (gate and
up read the MLP's input; q, k and v the attention's) share one covariance, found from the first
batch, so a Llama block needs two d x d covariances for its MLP, not three.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .dist import all_reduce_sum as _all_reduce_sum
from .reference import ReferenceSet, forked_rng, shard_batches
from .reference import token_counts as _count

# Module-name parts that mark a feed-forward block across common architectures (Llama, Qwen, Mistral,
# Gemma: `mlp`; Falcon/GPT-NeoX: `mlp`; InternLM and others: `feed_forward`; some: `ffn`).
MLP_PARTS = ("mlp", "feed_forward", "ffn")


@dataclass
class ConstrainedLayer:
    """One linear layer the null space constrains.

    name: the module's qualified name; module: the module the forward hook reads x from;
    matrices: the trainable (rows x d_in) matrices constrained by W <- W P (the weight, or each
    LoRA adapter's A); frozen: trainable parameters of the layer that would move its outputs on
    every input (a full fine-tuning bias), held fixed so the guarantee holds.
    """

    name: str
    module: torch.nn.Module
    matrices: list[torch.nn.Parameter]
    frozen: list[torch.nn.Parameter] = field(default_factory=list)
    space: int = -1  # index of its input covariance (shared by layers reading the same input)


def _lora_a(module) -> list[torch.nn.Parameter]:
    """The trainable A matrices of a PEFT LoRA layer (empty for anything else)."""
    lora_a = getattr(module, "lora_A", None)
    if not isinstance(lora_a, torch.nn.ModuleDict):
        return []
    return [m.weight for m in lora_a.values() if getattr(m, "weight", None) is not None and m.weight.requires_grad]


def _is_lora_child(name: str) -> bool:
    return any(part in ("lora_A", "lora_B", "base_layer", "lora_embedding_A", "lora_embedding_B")
               for part in name.split("."))


def _wanted(name: str, spec: str) -> bool:
    parts = name.split(".")
    if spec == "mlp":
        return any(p in MLP_PARTS for p in parts)
    if spec == "all_linear":
        return True
    return parts[-1] in {s.strip() for s in spec.split(",") if s.strip()}


def constrained_layers(model: torch.nn.Module, spec: str) -> list[ConstrainedLayer]:
    """The layers `spec` (`ogpsa_null_layers`) names that have a trainable matrix, in module order.

    The output head (the model's output embedding) is never constrained: its inputs are the final
    hidden states, and freezing its logits on the reference data is the job of the layers before it.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if module is head or _is_lora_child(name) or not _wanted(name, spec):
            continue
        lora = _lora_a(module)
        if lora:
            found.append(ConstrainedLayer(name, module, lora))
        elif isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            bias = module.bias
            frozen = [bias] if bias is not None and bias.requires_grad else []
            found.append(ConstrainedLayer(name, module, [module.weight], frozen))
    return found


@dataclass
class Covariances:
    """The reference inputs' covariances, one per distinct input (`ConstrainedLayer.space` indexes them),
    and each set's token counts."""

    matrices: list[torch.Tensor]
    tokens: dict[str, dict[str, int]]  # per set: input (non-padding) and padded positions


@contextlib.contextmanager
def _inference(model: torch.nn.Module, device: torch.device):
    """Eval mode (no dropout: the inputs are those of the deterministic model), no autograd, forked
    RNG; restores the mode on exit so training proceeds as if nothing ran."""
    was_training = model.training
    with forked_rng(device):
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)


class _Collector:
    """Forward hooks that add x^T x of the real positions to each layer's covariance.

    The first batch assigns covariances: layers whose input is the very same tensor share one.
    """

    def __init__(self, layers: list[ConstrainedLayer]):
        self.layers = layers
        self.matrices: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (batch, seq) bool of real positions, set per batch
        self._seen: dict[tuple, int] = {}  # (data_ptr, shape) of this batch's inputs -> covariance
        # the inputs seen so far in this batch, kept alive: a freed input's memory could be reused by a
        # later layer's input at the same address, which would then look like the same tensor
        self._alive: list[torch.Tensor] = []
        self._batch_done: set[int] = set()

    def hook(self, index: int):
        def record(module, inputs, output):
            x = inputs[0]
            layer = self.layers[index]
            if layer.space < 0:
                key = (x.data_ptr(), tuple(x.shape))
                if key not in self._seen:
                    self._alive.append(x)
                    self._seen[key] = len(self.matrices)
                    d = x.shape[-1]
                    self.matrices.append(torch.zeros(d, d, dtype=torch.float32, device=x.device))
                layer.space = self._seen[key]
            if layer.space in self._batch_done:
                return
            self._batch_done.add(layer.space)
            rows = (x[self.mask] if self.mask is not None else x).reshape(-1, x.shape[-1]).float()
            self.matrices[layer.space].addmm_(rows.T, rows)  # float32 accumulation (X^T X)

        return record

    def next_batch(self, batch: dict[str, torch.Tensor], counted: bool = True) -> None:
        """Start a micro-batch; `counted=False` (the probe, a top-up) runs it without adding to any covariance."""
        mask = batch.get("attention_mask")
        if not counted:
            self.mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        elif mask is not None and mask.dim() == 2:  # padding excluded: reference sets are never packed (2-D 0/1)
            self.mask = mask.bool()
        else:
            self.mask = None
        self._batch_done.clear()
        self._seen.clear()
        self._alive.clear()  # a new batch has new tensors; assignments made on the first batch stay


def input_covariances(model, layers: list[ConstrainedLayer], refs: list[ReferenceSet], collator, batch_size: int,
                      device: torch.device, progress=None, even: bool = False) -> Covariances:
    """Forward this rank's share of every reference set (prompt and answer tokens) and return the
    covariances of the constrained layers' inputs, summed over all samples of all sets and ranks.

    even: every rank runs as many micro-batches (for engines with collectives inside forward)."""
    for layer in layers:
        layer.space = -1
    collector = _Collector(layers)
    handles = [layer.module.register_forward_hook(collector.hook(i)) for i, layer in enumerate(layers)]
    tokens: dict[str, dict[str, int]] = {}
    try:
        with _inference(model, device):
            # A first forward of one short sample that counts nothing: it lays out the covariances (which
            # layers share an input) identically on every rank, even a rank whose share of a set is empty.
            probe = collator([dict(refs[0].features[-1])])
            probe = {k: v.to(device) for k, v in probe.items() if torch.is_tensor(v) and k != "labels"}
            collector.next_batch(probe, counted=False)
            model(**probe)
            for ref in refs:
                counts = torch.zeros(3, dtype=torch.float64, device=device)
                for batch, weight in shard_batches(ref, batch_size, collator, device, even=even):
                    collector.next_batch(batch, counted=weight != 0.0)  # a top-up runs for the collectives only
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                    counts += _count(batch, weight)
                    if progress is not None:
                        progress.update(1)
                _all_reduce_sum([counts])
                _, real, padded = (int(x) for x in counts.tolist())
                tokens[ref.name] = {"input": real, "padded": padded}
    finally:
        for h in handles:
            h.remove()
    missing = [layer.name for layer in layers if layer.space < 0]
    if missing:
        raise RuntimeError(f"ogpsa: the reference forward never reached {', '.join(missing[:3])}")
    _all_reduce_sum(collector.matrices)
    return Covariances(collector.matrices, tokens)
