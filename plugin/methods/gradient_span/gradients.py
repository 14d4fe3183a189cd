"""The gradient span's data: each reference set's gradient, measured at the current weights.

Set j's gradient is that of the mean answer-token NLL over its samples, taken over the trainable
parameters only (LoRA: the adapters). The batches come from `reference.shard_batches` (longest
first, dealt to the ranks by tokens); each rank sums token NLLs, and the sums and token counts are
all-reduced, so every rank ends with the same average gradient as one process over all samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ...dist import all_reduce_sum, rank_and_world
from ...reference import ReferenceSet, forked_rng, shard_batches, token_counts

@dataclass
class SetGradient:
    """One reference set's gradient, as the gradient functions yield it.

    rows: the filled basis-row buffers; `scale` x rows is the gradient of the summed answer-token
    NLL (of this rank's pieces when sharded), so `scale / answer_tokens` commits the mean's.
    Token counts are over all ranks: answer tokens (the loss's), input tokens (non-padding
    positions) and padded tokens (positions processed, top-up batches included): padded / input
    is the work padding adds.
    """

    name: str
    rows: list[torch.Tensor]
    answer_tokens: int
    input_tokens: int
    padded_tokens: int
    scale: float = 1.0


def _set_gradient(name: str, rows: list[torch.Tensor], counts: torch.Tensor, scale: float = 1.0) -> SetGradient:
    answer, real, padded = (int(x) for x in counts.tolist())
    return SetGradient(name, rows, answer, real, padded, scale)


@contextlib.contextmanager
def _isolated(model: torch.nn.Module, params: list[torch.nn.Parameter], device: torch.device):
    """Train mode (as the training forward), forked RNG, and empty .grad in and out.

    On exit every .grad is None again, so nothing computed here can reach the optimizer, and the
    RNG streams (dropout, data order) are exactly as they were: training proceeds as if the
    rebuild had not happened.
    """
    was_training = model.training
    saved = [p.grad for p in params]
    if any(g is not None for g in saved):
        raise RuntimeError("ogpsa: reference gradients requested while training gradients are pending")
    with forked_rng(device):
        model.train()
        try:
            yield
        finally:
            for p in params:
                p.grad = None
            model.train(was_training)


def _backward_set(model, ref: ReferenceSet, batch_size: int, collator, device, progress, even: bool = False
                  ) -> torch.Tensor:
    """Backward of the summed answer-token NLL of this rank's share of `ref`, micro-batch by micro-batch
    (gradients accumulate wherever `.grad` points); returns this rank's (answer, input, padded) counts."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for batch, weight in shard_batches(ref, batch_size, collator, device, even=even):
        count = token_counts(batch, weight)
        loss = model(**batch).loss  # mean NLL over this batch's answer tokens
        # x answer tokens -> the sum of token NLLs, so sets weight tokens equally (0 for a top-up batch)
        (loss * count[0].to(loss.dtype)).backward()
        counts += count
        if progress is not None:
            progress.update(1)
    return counts


def reference_gradients(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    refs: list[ReferenceSet],
    collator,
    batch_size: int,
    device: torch.device,
    rows: Callable[[], list[torch.Tensor]],
    progress=None,
) -> Iterator[SetGradient]:
    """Fill, for each reference set in turn, the buffers `rows()` returns with its gradient; yield
    a `SetGradient` with those buffers shaped as the parameters.

    `rows` is called once per set and returns one zeroed flat tensor per parameter
    (`BasisBuilder.next_row`). They are installed as `.grad`, so autograd accumulates straight into
    them: no copy, no allocation. The gradient is that of the summed answer-token NLL (divide by the
    answer-token count for the mean), all-reduced over data-parallel ranks. `.grad` is None between sets
    and after the last; `progress` (a tqdm-like object) is advanced per micro-batch.
    """
    with _isolated(model, params, device):
        for ref in refs:
            buffers = rows()
            for p, buf in zip(params, buffers):
                p.grad = buf.view_as(p)
            counts = _backward_set(model, ref, batch_size, collator, device, progress)
            for p, buf in zip(params, buffers):
                # autograd adds into an existing .grad in place; should it have put a new tensor there
                # instead (a hook, another layout), that tensor holds the whole sum: bring it home
                if p.grad is not None and p.grad.data_ptr() != buf.data_ptr():
                    buf.copy_(p.grad.reshape(-1))
                p.grad = None
            all_reduce_sum([counts, *buffers])
            yield _set_gradient(ref.name, [buf.view_as(p) for p, buf in zip(params, buffers)], counts)


def _whole_gradients(params: list[torch.nn.Parameter], grads: list[torch.Tensor | None], layout) -> list[torch.Tensor]:
    """One flat tensor per parameter, the same shapes on every rank, to be summed over ranks.

    A parameter the backward did not reach on this rank has no `.grad`: every parameter when
    `plan_batches` dealt this rank no batch of the set (fewer micro-batches than ranks), or an MoE
    expert no token of this rank's batches was routed to. It contributes zeros of its full size,
    so every rank enters the all-reduce with the same tensors, whatever it held; skipping it would
    pair the later collectives with the wrong tensors (a hang or a corrupt basis).
    """
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            out.append(torch.zeros(layout.full_numel(i), dtype=p.dtype, device=p.device))
        else:
            out.append(g.reshape(-1))
    return out


def sharded_reference_gradients(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    refs: list[ReferenceSet],
    collator,
    batch_size: int,
    device: torch.device,
    rows: Callable[[], list[torch.Tensor]],
    layout,
    progress=None,
) -> Iterator[SetGradient]:
    """`reference_gradients` for a basis that holds only this rank's piece of each parameter
    (`layout`, a `ShardLayout`), or a basis of another dtype than the parameters.

    Yields a `SetGradient` per set: `scale` times its row buffers is the summed answer-token NLL
    gradient of this rank's pieces. Two ways, by engine:
    - FSDP2: the backward pass goes through FSDP, which reduce-scatters each micro-batch's
      gradient into the local shard of `.grad`, averaged over ranks: the rows hold the sum / world,
      so scale = world.
    - otherwise (DDP, ZeRO-1/2/3): a plain backward with the engine's gradient hooks suspended,
      so autograd accumulates this rank's full gradient in `.grad` (ZeRO-3's module hooks still
      gather the parameters for forward and backward; gradient checkpointing works as in
      training); it is summed over ranks and each piece cut from it. A rebuild thus holds,
      beside the sharded basis, one full gradient, as a DDP step does.
    """
    through_engine = layout.engine == "fsdp2"
    hooks = contextlib.nullcontext() if through_engine else layout.reduction_suspended()
    with _isolated(model, params, device), hooks:
        for ref in refs:
            buffers = rows()
            counts = _backward_set(model, ref, batch_size, collator, device, progress, even=layout.collective_forward)
            grads = [p.grad for p in params]
            for p in params:
                p.grad = None
            if through_engine:
                all_reduce_sum([counts])
                for buf, g in zip(buffers, grads):
                    if g is not None:
                        buf.copy_(g._local_tensor.reshape(-1))
            else:
                flat = _whole_gradients(params, grads, layout)
                all_reduce_sum([counts, *flat])
                for i, (buf, g) in enumerate(zip(buffers, flat)):
                    piece = layout.piece(i)
                    if piece.numel:
                        buf.copy_(g[piece.start : piece.stop])
                del flat
            del grads
            yield _set_gradient(ref.name, buffers, counts, float(rank_and_world()[1]) if through_engine else 1.0)


