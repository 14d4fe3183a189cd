"""The null-space method's data: which linear layers it constrains, and their inputs' covariances.

`constrained_layers` picks the layers (`ogpsa_null_layers`) and the trainable matrix of each that
the constraint acts on: the weight under full and freeze fine-tuning, each adapter's A under LoRA.
`input_spaces` runs the reference sets forward (no backward) with forward hooks on those layers,
accumulates, per distinct input, the uncentred covariance X^T X of the non-padding positions in
float32, summed over data-parallel ranks, and hands each finished covariance to a `decompose`
function (the null-space math) before the next is made. Layers that read the same tensor (gate and
up read the MLP's input; q, k and v the attention's) share one covariance, found from a first probe
batch, so a Llama block needs two d x d covariances for its MLP, not three.

Memory: a covariance is complete only after the last reference batch, so the covariances cannot be
decomposed while the forwards run. Instead the distinct inputs are cut, in the order the model
reads them, into passes whose float32 covariances total at most `pass_budget` bytes (default:
`eigh_bytes(d_max)`, about 32 d_max^2: one eigendecomposition of the widest input). Each pass runs the
reference sets forward again (stopping once its last input has been read), then decomposes its
covariances one at a time, freeing each before the next. See `peak_bytes` for the resulting bound.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ...dist import all_reduce_sum
from ...reference import ReferenceSet, forked_rng, shard_batches, token_counts
from ...settings import OGPSAConfigError

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


def unconstrained_weights(model: torch.nn.Module, spec: str, layers: list[ConstrainedLayer]) -> list[str]:
    """Trainable weight matrices (2-D or more) inside the modules `spec` names that no constrained
    layer covers: an MoE block's fused 3-D expert weights (one (experts, out, in) tensor that each
    expert reads its routed tokens with) and its router (a bare weight applied with F.linear). They
    would train freely, so the null-space method refuses them rather than hold only part of a block.
    Embeddings and the output head are not weights of this kind."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    covered = {id(p) for layer in layers for p in (*layer.matrices, *layer.frozen)}
    found = []
    for name, module in model.named_modules():
        if module is head or isinstance(module, torch.nn.Embedding) or _is_lora_child(name) or not _wanted(name, spec):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in covered:  # ZeRO-3: whole shape
                found.append(f"{name}.{pname}" if name else pname)
    return found


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


@dataclass
class PassPlan:
    """How the distinct inputs (spaces) are collected: `passes[i]` lists the spaces pass i collects,
    consecutive in the order the model reads them; `dims[s]` is space s's input width."""

    dims: list[int]
    passes: list[list[int]]


def eigh_bytes(d: int) -> int:
    """Bytes one float64 eigendecomposition of a d x d covariance holds at its peak (CPU, LAPACK
    syevd as torch.linalg.eigh calls it): the float64 copy of C and the eigenvector matrix (8 d^2
    each), the workspace of 1 + 6d + 2d^2 doubles and 3 + 5d ints, the eigenvalues; 128 d covers
    every linear term. The float32 covariance is freed once its float64 copy exists."""
    return 32 * d * d + 128 * d


def plan_passes(dims: list[int], budget: int | None = None) -> PassPlan:
    """Cut spaces 0..n-1 (in reading order) into passes whose float32 covariances (4 d^2 bytes each)
    total at most `budget` bytes; a space wider than the budget gets a pass of its own."""
    if budget is None:
        budget = eigh_bytes(max(dims, default=0))
    passes: list[list[int]] = []
    used = 0
    for s, d in enumerate(dims):
        size = 4 * d * d
        if not passes or used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(s)
        used += size
    return PassPlan(list(dims), passes)


def peak_bytes(plan: PassPlan, kept: list[int], forward: int = 0) -> int:
    """Upper bound on the bytes `input_spaces` allocates and holds at once.

    kept[s]: the bytes of space s's stored result (`LayerSpace.nbytes()`: 4 d min(k, d - k)).
    forward: what one reference micro-batch's forward allocates at its peak (activations, logits,
    the hooks' float32 copies of the real rows); 0 leaves it out.
    While pass p runs its forwards it holds the results of every earlier space and all of p's
    covariances; while it decomposes its space s, the earlier results, the float32 covariances of
    the spaces of p after s, and s's eigendecomposition (`eigh_bytes`).
    """
    peak, done = 0, 0
    for spaces in plan.passes:
        waiting = sum(4 * plan.dims[s] ** 2 for s in spaces)
        peak = max(peak, done + waiting + forward)
        for s in spaces:
            waiting -= 4 * plan.dims[s] ** 2
            peak = max(peak, done + waiting + eigh_bytes(plan.dims[s]))
            done += kept[s]
    return peak


class _PassDone(Exception):
    """Raised from a hook once every covariance of this pass has this batch's rows: the rest of the
    forward would compute nothing this pass needs."""


class _Collector:
    """Forward hooks that add x^T x of the real positions to the covariances of this pass.

    The probe batch assigns covariances: layers whose input is the very same tensor share one.
    """

    def __init__(self, layers: list[ConstrainedLayer]):
        self.layers = layers
        self.dims: list[int] = []  # input width of each space, in the order the model reads them
        self.active: dict[int, torch.Tensor] = {}  # this pass's covariances
        self.stop_early = False
        self.mask: torch.Tensor | None = None  # (batch, seq) bool of real positions, set per batch
        self._seen: dict[tuple, int] = {}  # (data_ptr, shape) of the probe's inputs -> space
        # the probe's inputs, kept alive: a freed input's memory could be reused by a later layer's
        # input at the same address, which would then look like the same tensor
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
                    self._seen[key] = len(self.dims)
                    self.dims.append(x.shape[-1])
                layer.space = self._seen[key]
            if layer.space not in self.active or layer.space in self._batch_done:
                return
            self._batch_done.add(layer.space)
            rows = x.reshape(-1, x.shape[-1])  # (b, s, d), or (b*s, d) where a block flattens (MoE)
            if self.mask is not None:
                mask = self.mask.reshape(-1)
                if rows.shape[0] != mask.numel():
                    raise OGPSAConfigError(
                        f"ogpsa_null_layers: {layer.name} reads {rows.shape[0]} input rows for a batch of "
                        f"{mask.numel()} positions (an MoE expert that sees only its routed tokens?); the "
                        "null-space method cannot tell its padding apart; leave it out of ogpsa_null_layers"
                    )
                rows = rows[mask]
            self.active[layer.space].addmm_(rows.T.float(), rows.float())  # float32 accumulation (X^T X)
            if self.stop_early and len(self._batch_done) == len(self.active):
                raise _PassDone

        return record

    def start_pass(self, spaces: list[int], device: torch.device) -> None:
        self.active = {s: torch.zeros(self.dims[s], self.dims[s], dtype=torch.float32, device=device) for s in spaces}
        self._seen.clear()
        self._alive.clear()  # assignments made on the probe stay

    def next_batch(self, batch: dict[str, torch.Tensor], counted: bool = True) -> None:
        """Start a micro-batch; `counted=False` (a top-up) runs it without adding to any covariance."""
        mask = batch.get("attention_mask")
        if not counted:
            self.mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        elif mask is not None and mask.dim() == 2:  # padding excluded: reference sets are never packed (2-D 0/1)
            self.mask = mask.bool()
        else:
            self.mask = None
        self._batch_done.clear()


def _forward(model, batch: dict[str, torch.Tensor]) -> None:
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    except _PassDone:
        pass


def input_spaces(model, layers: list[ConstrainedLayer], refs: list[ReferenceSet], collator, batch_size: int,
                 device: torch.device, decompose, progress=None, even: bool = False,
                 pass_budget: int | None = None) -> tuple[list, dict[str, dict[str, int]], PassPlan]:
    """Forward this rank's share of every reference set (prompt and answer tokens) and return
    (`decompose(C)` for each distinct input's covariance C, summed over all samples of all sets and
    ranks, in space order; each set's input and padded token counts; the pass plan).

    Nothing else holds a covariance once it is handed to `decompose`, which may therefore release
    its storage as soon as it has what it needs (`build_space(free_input=True)`).
    even: every rank runs as many micro-batches (for engines with collectives inside forward; no
    pass then stops its forwards early). pass_budget: see `plan_passes`."""
    for layer in layers:
        layer.space = -1
    collector = _Collector(layers)
    handles = [layer.module.register_forward_hook(collector.hook(i)) for i, layer in enumerate(layers)]
    tokens: dict[str, dict[str, int]] = {}
    results: list = []
    try:
        with _inference(model, device):
            # A first forward of one short sample that counts nothing: it lays out the covariances (which
            # layers share an input) identically on every rank, even a rank whose share of a set is empty.
            probe = collator([dict(refs[0].features[-1])])
            probe = {k: v.to(device) for k, v in probe.items() if torch.is_tensor(v)}
            collector.next_batch(probe, counted=False)
            _forward(model, probe)
            missing = [layer.name for layer in layers if layer.space < 0]
            if missing:
                raise RuntimeError(f"ogpsa: the reference forward never reached {', '.join(missing[:3])}")
            plan = plan_passes(collector.dims, pass_budget)
            if progress is not None and len(plan.passes) > 1:
                progress.total = (progress.total or 0) * len(plan.passes)
                progress.refresh()
            collector.stop_early = not even
            for spaces in plan.passes:
                collector.start_pass(spaces, device)
                for ref in refs:
                    counts = torch.zeros(3, dtype=torch.float64, device=device)
                    for batch, weight in shard_batches(ref, batch_size, collator, device, even=even):
                        collector.next_batch(batch, counted=weight != 0.0)  # a top-up runs for the collectives only
                        _forward(model, batch)
                        counts += token_counts(batch, weight)
                        if progress is not None:
                            progress.update(1)
                    if ref.name not in tokens:  # counted on the first pass
                        all_reduce_sum([counts])
                        _, real, padded = (int(x) for x in counts.tolist())
                        tokens[ref.name] = {"input": real, "padded": padded}
                all_reduce_sum(list(collector.active.values()))
                for s in spaces:
                    results.append(decompose(collector.active.pop(s)))
    finally:
        for h in handles:
            h.remove()
        collector.active = {}
    return results, tokens, plan
