"""Data-parallel helpers shared by the plugin: who this rank is, summing over ranks, agreeing.

Every function works without a process group (one process: rank 0 of 1, sums are no-ops), so the
maths and the callback call them unconditionally. Each collective is entered by every rank with the
same shapes; callers keep that promise (see `reference.shard_batches` for ranks that hold no reference batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    """True inside a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return rank_and_world()[1]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (issued together, then waited for); no-op on one process."""
    if world_size() == 1:
        return
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
    for w in works:
        w.wait()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it: the `reduce` the projection maths takes for
    sharded layouts (only called there, i.e. inside a process group)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order; `[t]` without a process group."""
    if world_size() == 1:
        return [t]
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return out


def all_ranks_agree(ok: bool, device) -> bool:
    """True only if `ok` on every data-parallel rank (one all-reduce; `ok` itself without a process group)."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def spread(value: torch.Tensor) -> float:
    """Largest difference across ranks of a one-element tensor (0.0 on one process)."""
    if world_size() == 1:
        return 0.0
    gathered = [torch.zeros_like(value) for _ in range(world_size())]
    dist.all_gather(gathered, value)
    values = torch.cat(gathered)
    return float(values.max() - values.min())
