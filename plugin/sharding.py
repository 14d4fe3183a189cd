"""Where this rank's piece of every trainable parameter lives, for each training engine.

The gradient span's projection (`methods/gradient_span/maths.py`) works on lists of flat tensors, one per trainable parameter, and
an optional `reduce` that completes inner products across ranks. A `ShardLayout` supplies both:

- `Replicated` (one process, DDP): every rank holds whole parameters and the averaged `.grad`;
  the trainer's own callbacks sit where the projection belongs (after clipping, before and after
  `optimizer.step()`), and nothing is reduced.
- `ZeroLayout` (DeepSpeed ZeRO-1/2) and `Zero3Layout` (ZeRO-3): each rank owns a contiguous piece
  of a flat float32 master partition per optimizer group; the engine reduces the gradients into
  it and steps inside `engine.step()`, which accelerate calls from `backward()` before the
  trainer's `on_pre_optimizer_step` fires. The projection therefore runs inside the engine, by
  wrapping the ZeRO optimizer's `_optimizer_step(group)`: at that point the group's partition
  `.grad` is unscaled and clipped (the same order as DDP: clip -> project -> step), and the step
  is then taken on the float32 master partition, which is where the `update` target acts.
- `FSDP2Layout`: parameters are DTensors sharded on dim 0; `.grad` is reduce-scattered in the
  backward pass and clipped by the trainer, so the trainer's callbacks fit as for DDP, on the local
  shards.

`piece(i)` gives the range of parameter i's flattened full tensor that this rank holds; a
rebuild cuts each full reference gradient to it, so every rank stores 1/world of the basis.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .dist import reduce_sum

GroupViews = list[Optional[torch.Tensor]]


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of a parameter's flattened full tensor, held by this rank."""

    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class ShardLayout:
    """The common interface; `Replicated` is the unsharded case."""

    engine = "ddp"
    sharded = False
    collective_forward = False  # forward/backward run collectives: every rank must run as many micro-batches
    steps_inside_engine = False  # the optimizer steps before the trainer's on_pre_optimizer_step

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    @property
    def reduce(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        return reduce_sum if self.sharded else None

    @property
    def groups(self) -> list[int]:
        return [0]

    def piece(self, i: int) -> Piece:
        return Piece(0, self.params[i].numel())

    def full_numel(self, i: int) -> int:
        return self.params[i].numel()

    def group_of(self, i: int) -> int:
        return 0

    def weights(self, group: int = 0) -> GroupViews:
        """Flat views of this rank's master weights, aligned with `params` (None: not in `group`)."""
        return [p.detach().view(-1) for p in self.params]

    def grads(self, group: int = 0) -> GroupViews:
        return [None if p.grad is None else p.grad.view(-1) for p in self.params]

    def like(self) -> list[torch.Tensor]:
        """One tensor per parameter with the numel, dtype and device of this rank's piece."""
        return [p.detach() for p in self.params]

    def hook_step(self, before, after) -> Callable[[], None]:
        """Run before(group) / after(group) around the engine's step of each group; returns an undo."""
        raise NotImplementedError(f"{self.engine}: the trainer's callbacks take the step")

    def _reduction_hooks(self) -> list[tuple[dict, Optional[set]]]:
        """(hook dict, keys to take out or None for all) of every hook through which the engine
        reduces gradients as autograd produces them: each parameter's post-accumulate-grad hooks
        (DeepSpeed ZeRO registers its reduction there)."""
        out = []
        for p in self.params:
            hooks = getattr(p, "_post_accumulate_grad_hooks", None)
            if hooks:
                out.append((hooks, None))
        return out

    @contextlib.contextmanager
    def reduction_suspended(self):
        """Take the engine's gradient-reduction hooks out while a reference backward runs, then put
        them back in their order: a reference gradient must not feed the engine's buckets. The
        dicts are emptied in place (autograd and the modules hold them)."""
        saved = []
        for hooks, keys in self._reduction_hooks():
            saved.append((hooks, list(hooks.items())))
            for key in list(hooks) if keys is None else [k for k in list(hooks) if k in keys]:
                del hooks[key]
        try:
            yield
        finally:
            for hooks, items in saved:
                hooks.clear()
                hooks.update(items)

    def check_no_pending_reduction(self) -> None:
        """Raise if the engine holds gradients queued for reduction (nothing to check unsharded)."""



class Replicated(ShardLayout):
    pass


class _FlatPartitionLayout(ShardLayout):
    """ZeRO: each rank's pieces are slices of one flat float32 master partition per optimizer group."""

    sharded = True
    steps_inside_engine = True

    def __init__(self, params, optimizer, flats: list[torch.Tensor]):
        super().__init__(params)
        self.optimizer = optimizer
        self.flats = flats
        self._pieces = [Piece(0, 0)] * len(params)
        self._full = [0] * len(params)
        self._group = [0] * len(params)  # the optimizer group of parameter i, whether or not this rank holds a piece
        # (group, offset in the group's flat partition) of parameter i's local piece
        self._where: list[tuple[int, int] | None] = [None] * len(params)

    @property
    def groups(self) -> list[int]:
        return list(range(len(self.flats)))

    def _place(self, i: int, group: int, offset: int, piece: Piece, full: int) -> None:
        self._pieces[i], self._full[i], self._group[i] = piece, full, group
        self._where[i] = (group, offset) if piece.numel else None

    def group_of(self, i: int) -> int:
        """The optimizer group (`groups`) parameter i belongs to, on every rank."""
        return self._group[i]

    def piece(self, i: int) -> Piece:
        return self._pieces[i]

    def full_numel(self, i: int) -> int:
        return self._full[i]

    def _views(self, group: int, flat: Optional[torch.Tensor]) -> GroupViews:
        out: GroupViews = []
        for where, piece in zip(self._where, self._pieces):
            inside = flat is not None and where is not None and where[0] == group
            out.append(flat[where[1] : where[1] + piece.numel] if inside else None)
        return out

    def weights(self, group: int = 0) -> GroupViews:
        return self._views(group, self.flats[group].detach())

    def grads(self, group: int = 0) -> GroupViews:
        return self._views(group, self.flats[group].grad)

    def like(self) -> list[torch.Tensor]:
        out = []
        for where, piece in zip(self._where, self._pieces):
            flat = self.flats[where[0]] if where else self.flats[0]
            out.append(flat.detach()[where[1] : where[1] + piece.numel] if where else flat.new_empty(0))
        return out

    def hook_step(self, before, after) -> Callable[[], None]:
        optimizer = self.optimizer
        original = optimizer._optimizer_step

        def _optimizer_step(group_no, *args, **kwargs):
            before(group_no)
            result = original(group_no, *args, **kwargs)
            after(group_no)
            return result

        optimizer._optimizer_step = _optimizer_step

        def undo():
            if optimizer.__dict__.get("_optimizer_step") is _optimizer_step:
                del optimizer._optimizer_step

        return undo

    def check_no_pending_reduction(self) -> None:
        """After a rebuild: ZeRO's gradient buckets must be empty and no parameter marked reduced.

        A reference backward runs with the reduction hooks taken out (`reduction_suspended`); a
        DeepSpeed release that reduces through another path would leave the reference gradient in
        a bucket, to be reduced into (or to break) the next training step. Fail loudly instead."""
        buckets = getattr(self.optimizer, "ipg_buckets", None)
        reduced = getattr(self.optimizer, "params_already_reduced", None)
        if buckets is None or reduced is None:
            raise RuntimeError(f"ogpsa: this DeepSpeed release keeps its {self.engine} gradient buckets under other "
                               "names, so a rebuild cannot be checked; install deepspeed==0.19.8 (constraints.txt)")
        queued = sum(len(b.params) for b in buckets.values()) + sum(bool(b.elements) for b in buckets.values())
        marked = sum(map(bool, reduced.values() if isinstance(reduced, dict) else reduced))
        # reduced gradient partitions live here until the engine steps (then None); a rebuild runs
        # between steps, so any left means a reference gradient was reduced into the partitions
        partial = sum(g is not None for g in getattr(self.optimizer, "averaged_gradients", {}).values())
        if queued or marked or partial:
            raise RuntimeError(
                f"ogpsa: the {self.engine} engine holds a pending gradient reduction after a rebuild ({queued} queued, "
                f"{marked} parameters marked reduced, {partial} groups with reduced gradients): the reference "
                "backward reached DeepSpeed through a hook OGPSA does not suspend; install deepspeed==0.19.8 "
                "(constraints.txt)"
            )

    def check(self, master_of: Callable[[int], torch.Tensor]) -> None:
        """Every local piece must equal the engine's own copy of those weights (a layout check that
        fails loudly if a DeepSpeed version lays its partitions out differently)."""
        for i, where in enumerate(self._where):
            if where is None:
                continue
            ours = self.flats[where[0]].detach()[where[1] : where[1] + self._pieces[i].numel]
            theirs = master_of(i)
            if not torch.equal(ours.to(theirs.dtype), theirs):
                raise RuntimeError(
                    f"ogpsa: the {self.engine} partition layout of parameter {i} is not the expected one "
                    "(unsupported DeepSpeed version?)"
                )


class ZeroLayout(_FlatPartitionLayout):
    """DeepSpeed ZeRO-1/2 (`DeepSpeedZeroOptimizer`): each group is flattened (params in
    `round_robin_bit16_groups` order, at `round_robin_bit16_offsets`) and cut into world equal
    partitions; this rank's float32 master partition is `single_partition_of_fp32_groups[g]`."""

    def __init__(self, params, optimizer, stage: int):
        super().__init__(params, optimizer, list(optimizer.single_partition_of_fp32_groups))
        self.engine = f"zero{stage}"
        index = {id(p): i for i, p in enumerate(params)}
        for g, group in enumerate(optimizer.round_robin_bit16_groups):
            rank = dist.get_rank(group=optimizer.real_dp_process_group[g])
            lo = rank * optimizer.partition_size[g]
            hi = lo + optimizer.partition_size[g]
            metas = optimizer.round_robin_bit16_meta[g]
            for p, meta, off in zip(group, metas, optimizer.round_robin_bit16_offsets[g]):
                if id(p) not in index:
                    continue
                n = meta.numel()
                a, b = max(off, lo), min(off + n, hi)
                piece = Piece(a - off, b - off) if a < b else Piece(0, 0)
                self._place(index[id(p)], g, a - lo, piece, n)
        self.check(lambda i: params[i].detach().view(-1)[self._pieces[i].start : self._pieces[i].stop])


class Zero3Layout(_FlatPartitionLayout):
    """DeepSpeed ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): every parameter is cut into world pieces
    of `partition_numel()` (the last padded); a sub-group's float32 master partition
    `fp32_partitioned_groups_flat[g]` is its parameters' pieces side by side."""

    engine = "zero3"
    collective_forward = True  # ZeRO-3 gathers parameters in every forward and backward

    def __init__(self, params, optimizer):
        super().__init__(params, optimizer, list(optimizer.fp32_partitioned_groups_flat))
        index = {id(p): i for i, p in enumerate(params)}
        for g, group in enumerate(optimizer.fp16_groups):
            rank = dist.get_rank(group=optimizer.sub_group_process_groups[g])
            offset = 0
            for p in group:
                size = p.partition_numel()
                start = rank * size
                held = max(0, min(size, p.ds_numel - start))
                if id(p) in index:
                    self._place(index[id(p)], g, offset, Piece(start, start + held), p.ds_numel)
                offset += size
        self.check(lambda i: params[i].ds_tensor.detach().view(-1)[: self._pieces[i].numel])

    def full_numel(self, i: int) -> int:
        return self._full[i]

    def _reduction_hooks(self) -> list[tuple[dict, Optional[set]]]:
        """Also the full backward hooks DeepSpeed puts on ZeRO-3 leaf modules (MoE blocks that
        LLaMA-Factory marks with `set_z3_leaf_modules`): their parameters are reduced from the
        module's backward hook, not from per-parameter hooks. Only DeepSpeed's own hooks are taken
        out of those modules (by handle id)."""
        out = super()._reduction_hooks()
        by_dict: dict[int, tuple[dict, set]] = {}
        for handle in getattr(self.optimizer, "_leaf_module_hooks", []):
            hooks = handle.hooks_dict_ref()
            if hooks is not None:
                by_dict.setdefault(id(hooks), (hooks, set()))[1].add(handle.id)
        return out + list(by_dict.values())


class FSDP2Layout(ShardLayout):
    """FSDP2 (`fully_shard`): DTensor parameters sharded on dim 0 (rank r holds rows
    [r * ceil(d0 / W), ...) as torch.chunk does), gradients sharded the same way."""

    engine = "fsdp2"
    sharded = True
    collective_forward = True

    def __init__(self, params):
        super().__init__(params)
        self._pieces = []
        for i, p in enumerate(params):
            local = p._local_tensor
            rows = p.shape[0] if p.dim() else 1
            row = p.numel() // max(rows, 1)
            world = p.device_mesh.size()
            chunk = -(-rows // world)
            first = min(p.device_mesh.get_local_rank() * chunk, rows)
            held = local.shape[0] if local.dim() else local.numel()
            if held != max(0, min(chunk, rows - first)):
                raise RuntimeError(f"ogpsa: FSDP2 parameter {i} is not sharded as expected (dim 0, torch.chunk)")
            self._pieces.append(Piece(first * row, (first + held) * row))

    def piece(self, i: int) -> Piece:
        return self._pieces[i]

    def weights(self, group: int = 0) -> GroupViews:
        return [p._local_tensor.detach().view(-1) for p in self.params]

    def grads(self, group: int = 0) -> GroupViews:
        return [None if p.grad is None else p.grad._local_tensor.view(-1) for p in self.params]

    def like(self) -> list[torch.Tensor]:
        return [p._local_tensor.detach() for p in self.params]

