"""OGPSA projection math: pure tensor code, torch only.

State and transform are kept apart (as PyTorch's PowerSGD hook keeps `PowerSGDState` apart from
the hook): `build_basis` turns reference gradients into a `SubspaceBasis` (the state, with
`state_dict`), and `project_` applies it to a list of gradients in place (the transform).

Notation: P parameter tensors; m reference sets; r_j the gradient of reference set j (one tensor per
parameter); g the safety gradient. A *block* is the unit of orthogonalisation:
  - granularity "tensor": every parameter tensor is its own block (as the released OGPSA code):
    each tensor's gradient is projected against that tensor's slice of the reference gradients;
  - granularity "global": one block holding all parameters (as the paper's derivation: the whole
    model is one vector).
Per block the basis U has k <= m orthonormal rows spanning the block's slice of {r_j}; the
projection is g <- g - U^T U g, which leaves g orthogonal to every r_j, so each reference loss
L_j is unchanged to first order by the step -lr * g: dL_j = -lr * <r_j, g> = 0.

Worked example (one block, m = 2, exact arithmetic):

    >>> import torch
    >>> r = [[torch.tensor([1.0, 0.0, 0.0])], [torch.tensor([1.0, 1.0, 0.0])]]
    >>> basis = build_basis(r, granularity="global")
    >>> basis.rank()        # span{(1,0,0), (1,1,0)} is the x-y plane
    2
    >>> g = [torch.tensor([3.0, -4.0, 5.0])]
    >>> stats = project_(g, basis)
    >>> g[0]                # only the z component survives
    tensor([0., 0., 5.])
    >>> round(stats.removed_fraction, 4)   # |(3,-4,0)| / |(3,-4,5)| = 5 / sqrt(50)
    0.7071
    >>> [round(c, 4) for c in stats.cosines]  # raw cosines with r_1 and r_2
    [0.4243, -0.1]

In "conflict" mode (A-GEM style) the in-span component is removed only from a block whose
gradient conflicts with some reference gradient, i.e. <g, r_j> < 0 for some j, meaning the
descent step -lr * g would raise L_j to first order. The g above conflicts with r_2, so it would
be projected; g = (1, 1, 0) conflicts with neither and is left untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# A Gram-Schmidt residual smaller than this fraction of the reference gradient's own norm is
# treated as linear dependence (a duplicated or colinear reference set, or a block that the
# reference loss does not reach) and dropped instead of normalised into a noise direction. fp32
# round-off after two Gram-Schmidt passes is ~1e-7 relative, so 1e-5 sits well above noise while
# a genuinely new direction (cosine < 0.99999 with the span) is kept.
RANK_RTOL = 1e-5

GRANULARITIES = ("tensor", "global")
MODES = ("project", "conflict", "observe")


@dataclass
class SubspaceBasis:
    """The capability subspace: orthonormal directions per block, plus what logging needs.

    directions[i]: (k_b, numel_i) rows of the basis restricted to parameter i, where b is i's block.
        For "tensor" granularity each row has unit norm; for "global" the rows are unit-norm as
        whole-model vectors (the slices of one row across all parameters). Stored in the gradient
        dtype on the gradient device, so the projection never copies between host and device.
    coords[b]: (m, k_b) float32 coordinates of each reference gradient's block slice in the basis
        (r_j restricted to block b equals coords[b][j] @ U_b); used by "conflict" mode and cosines.
    ref_norms: (m,) float32 whole-model norms of the reference gradients.
    """

    granularity: str
    directions: list[torch.Tensor]
    coords: list[torch.Tensor]
    ref_norms: torch.Tensor
    names: list[str] = field(default_factory=list)
    _layout: "Layout | None" = field(default=None, repr=False, compare=False)

    def blocks(self) -> list[list[int]]:
        return block_layout(len(self.directions), self.granularity)

    def layout(self) -> "Layout":
        """Derived index tensors for the vectorised bookkeeping (cached; not part of the state)."""
        if self._layout is None:
            self._layout = Layout.of(self)
        return self._layout

    def rank(self) -> int:
        """Largest number of directions of any block (the subspace dimension for "global")."""
        return max((c.shape[1] for c in self.coords), default=0)

    def numel(self) -> int:
        """Number of stored basis entries (memory = numel * element size)."""
        return sum(d.numel() for d in self.directions)

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.directions)

    def state_dict(self) -> dict:
        return {
            "granularity": self.granularity,
            "directions": list(self.directions),
            "coords": list(self.coords),
            "ref_norms": self.ref_norms,
            "names": list(self.names),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "SubspaceBasis":
        return cls(
            granularity=state["granularity"],
            directions=list(state["directions"]),
            coords=list(state["coords"]),
            ref_norms=state["ref_norms"],
            names=list(state.get("names", [])),
        )


@dataclass
class Layout:
    """Non-empty blocks, their ranks, and all block coordinates side by side.

    coords: (m, K) float32, the columns of every block's (m, k_b) coordinate matrix concatenated;
    col_block: (K,) the block index of each column; K = sum of the block ranks.
    """

    blocks: list[list[int]]
    ranks: list[int]
    coords: torch.Tensor
    col_block: torch.Tensor
    num_blocks: int
    has_rank: torch.Tensor  # (num_blocks,) 1.0 where the block has at least one direction

    @classmethod
    def of(cls, basis: "SubspaceBasis") -> "Layout":
        blocks = basis.blocks()
        ranks = [c.shape[1] for c in basis.coords]
        device = basis.ref_norms.device
        m = basis.ref_norms.numel()
        kept = [c.to(device) for c in basis.coords if c.shape[1] > 0]
        coords = torch.cat(kept, dim=1) if kept else torch.zeros((m, 0), device=device)
        col_block = torch.tensor(
            [b for b, k in enumerate(ranks) for _ in range(k)], dtype=torch.long, device=device
        )
        has_rank = torch.tensor([float(k > 0) for k in ranks] or [0.0], device=device)
        return cls(blocks, ranks, coords, col_block, max(len(blocks), 1), has_rank)


def block_layout(num_params: int, granularity: str) -> list[list[int]]:
    """Parameter indices per block for a granularity."""
    if granularity == "tensor":
        return [[i] for i in range(num_params)]
    if granularity == "global":
        return [list(range(num_params))]
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _block_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    # Inner product of two block vectors (lists of flat tensors), accumulated in float32 one
    # tensor at a time: only one tensor's upcast copy exists at once (none for float32 input).
    return torch.stack([torch.dot(x.float(), y.float()) for x, y in zip(a, b)]).sum()


class BasisBuilder:
    """Streams reference gradients in, one set at a time, and orthonormalises them on arrival.

    Memory: the rows are preallocated in the gradient dtype (the basis itself) and the incoming
    gradient is orthogonalised in the next free row, so a rebuild holds the basis plus the one
    gradient being added, never m raw gradients or float32 copies of them (for a bf16 7B model
    that is 46 GB instead of 91 GB at m = 3).

    Classical Gram-Schmidt run twice per vector ("twice is enough": the second pass restores
    orthogonality to working precision even when reference gradients are nearly colinear, which
    one pass does not). A block is a vector spread over many tensors, so its inner products are
    sums of per-tensor dots and no whole-model vector is ever concatenated. Inner products are
    float32 whatever the storage dtype; with bf16 storage the rows are orthonormal to bf16
    precision (~1e-3), the precision the gradients themselves have.
    """

    def __init__(self, like: list[torch.Tensor], max_rank: int, granularity: str = "tensor", rtol: float = RANK_RTOL):
        self.granularity = granularity
        self.rtol = rtol
        self.blocks = block_layout(len(like), granularity)
        # rows[i][q] is row q of parameter i's slice; filled in place as directions are accepted.
        self.rows = [torch.zeros((max_rank, t.numel()), dtype=t.dtype, device=t.device) for t in like]
        self.rank = [0] * len(self.blocks)
        self.coeffs: list[list[list[float]]] = [[] for _ in self.blocks]  # per block, per set: <r_j, u_q>
        self.norms: list[float] = []
        self.names: list[str] = []

    def add(self, grads: list[torch.Tensor], name: str = "") -> float:
        """Orthogonalise one reference gradient (one tensor per parameter) into the basis.

        Returns its whole-model norm. The caller checks finiteness first (it can name the set).
        """
        if len(grads) != len(self.rows):
            raise ValueError(f"reference gradient {name!r} has {len(grads)} tensors, expected {len(self.rows)}")
        sq = 0.0
        for b, block in enumerate(self.blocks):
            sq += self._add_to_block(b, block, [grads[i].detach().reshape(-1) for i in block])
        self.norms.append(math.sqrt(sq))
        self.names.append(name)
        return self.norms[-1]

    def _add_to_block(self, b: int, block: list[int], vec: list[torch.Tensor]) -> float:
        k = self.rank[b]
        if k >= self.rows[block[0]].shape[0]:
            raise ValueError(f"more reference sets than max_rank={self.rows[block[0]].shape[0]}")
        # Work in the next free row of the buffer (a copy of the incoming gradient).
        v = [self.rows[i][k] for i in block]
        torch._foreach_copy_(v, vec)
        norm0_sq = float(_block_dot(v, v))
        coef = [0.0] * k
        for _ in range(2):  # CGS2
            for q in range(k):
                c = float(_block_dot([self.rows[i][q] for i in block], v))
                coef[q] += c
                torch._foreach_add_(v, [self.rows[i][q] for i in block], alpha=-c)
        norm = float(_block_dot(v, v).sqrt())
        if norm0_sq > 0 and norm > self.rtol * math.sqrt(norm0_sq):
            torch._foreach_mul_(v, 1.0 / norm)
            coef.append(norm)
            self.rank[b] = k + 1
        else:
            torch._foreach_zero_(v)  # dependent (or zero) on this block: nothing new to span
        self.coeffs[b].append(coef)
        return norm0_sq

    def finish(self) -> SubspaceBasis:
        """The basis: each parameter's rows cut to its block rank (views, no copy)."""
        m = len(self.norms)
        directions: list[torch.Tensor] = [torch.empty(0)] * len(self.rows)
        coords = []
        for b, block in enumerate(self.blocks):
            k = self.rank[b]
            device = self.rows[block[0]].device if block else "cpu"
            coord = torch.zeros((m, k), dtype=torch.float32)
            for j, c in enumerate(self.coeffs[b]):
                coord[j, : len(c)] = torch.tensor(c, dtype=torch.float32)
            coords.append(coord.to(device))
            for i in block:
                rows = self.rows[i]
                # keep the buffer when full; otherwise copy the used rows so the rest is freed
                directions[i] = rows if k == rows.shape[0] else rows[:k].clone()
        device = self.rows[0].device if self.rows else "cpu"
        ref_norms = torch.tensor(self.norms, dtype=torch.float32, device=device)
        self.rows = []  # the basis owns the storage now
        return SubspaceBasis(self.granularity, directions, coords, ref_norms, list(self.names))


def build_basis(
    ref_grads: list[list[torch.Tensor]],
    granularity: str = "tensor",
    names: list[str] | None = None,
    rtol: float = RANK_RTOL,
) -> SubspaceBasis:
    """Orthonormalise reference gradients into a `SubspaceBasis` (all sets given at once).

    ref_grads[j][i] is reference set j's gradient for parameter i (any shape; all sets alike).
    See `BasisBuilder` for the algorithm; this is its one-shot form.
    """
    if not ref_grads:
        raise ValueError("build_basis needs at least one reference gradient")
    builder = BasisBuilder(ref_grads[0], len(ref_grads), granularity, rtol)
    for j, grads in enumerate(ref_grads):
        builder.add(grads, (names or [])[j] if names and j < len(names) else f"ref{j}")
    return builder.finish()


@dataclass
class ProjectionStats:
    """What one projection did, as Python floats (one host sync per call).

    grad_norm: norm of the raw gradient; removed_norm: norm of what was subtracted;
    removed_fraction = removed_norm / grad_norm; cosines[j]: cosine between the raw gradient and
    reference gradient j (whole-model); projected_blocks: blocks that were changed.
    """

    grad_norm: float
    removed_norm: float
    removed_fraction: float
    cosines: list[float]
    projected_blocks: int
    total_blocks: int


@torch.no_grad()
def project_(grads: list[torch.Tensor | None], basis: SubspaceBasis, mode: str = "project") -> ProjectionStats:
    """Remove the in-subspace component of `grads` in place; return what was removed.

    grads[i] is parameter i's gradient (same order as the basis; None counts as zero and is left
    None). mode: "project" removes U^T U g from every block; "conflict" only from blocks where
    <g, r_j> < 0 for some reference set j; "observe" measures and changes nothing.

    Cost: per parameter one matvec U_i g_i and one in-place `addmv_` on the `.grad` storage (the
    fewest bytes: U is read twice, g read twice and written once); everything else (conflict
    gates, cosines, norms) is a handful of vector ops over all blocks at once, so the number of
    kernel launches is 2P + O(1), not O(P) per statistic. No host/device copies: one `.tolist()`
    at the end brings the metrics back. Coefficients are formed in the gradient dtype (bf16
    matmuls accumulate in fp32 on GPU) and combined in fp32.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(grads) != len(basis.directions):
        raise ValueError(f"got {len(grads)} gradients for a basis over {len(basis.directions)} parameters")
    present = [g for g in grads if g is not None]
    device = present[0].device if present else basis.ref_norms.device
    layout = basis.layout()
    m = basis.ref_norms.numel()
    # "project" removes every block's component whatever the statistics say, so each block is
    # subtracted right after its coefficients are formed: with tensor granularity U_i and g_i are
    # then still in cache (GPU L2) for the second pass, which roughly halves the DRAM traffic.
    eager = mode == "project"
    coef = _coefficients(grads, basis, layout, device, subtract=eager)  # (K,) fp32: U g per block
    contrib = layout.coords * coef  # (m, K): each column's share of <g, r_j>
    block_dots = torch.zeros((m, layout.num_blocks), dtype=torch.float32, device=device)
    block_dots.index_add_(1, layout.col_block, contrib)
    dots = block_dots.sum(dim=1)  # (m,) whole-model <g, r_j>
    if mode == "project":
        gate = torch.ones(layout.num_blocks, dtype=torch.float32, device=device)
    elif mode == "conflict":
        gate = (block_dots < 0).any(dim=0).float()
    else:
        gate = torch.zeros(layout.num_blocks, dtype=torch.float32, device=device)
    removed = coef * gate[layout.col_block]
    if mode == "conflict":
        _subtract(grads, basis, layout, removed)
    removed_sq = removed.square().sum()
    grad_sq = torch.stack(torch._foreach_norm(present)).float().square().sum() if present else removed_sq * 0
    # |g_raw|^2 = |g_new|^2 + |removed|^2 (the removed part is orthogonal to what remains)
    grad_sq = grad_sq + removed_sq
    cos_den = grad_sq.sqrt() * basis.ref_norms.to(device)
    cosines = torch.where(cos_den > 0, dots / cos_den.clamp_min(1e-30), torch.zeros_like(dots))
    packed = torch.cat([grad_sq.sqrt().reshape(1), removed_sq.sqrt().reshape(1), (gate * layout.has_rank).sum().reshape(1), cosines])
    gnorm, rnorm, nchanged, *cos = packed.tolist()
    return ProjectionStats(
        grad_norm=gnorm,
        removed_norm=rnorm,
        removed_fraction=(rnorm / gnorm) if gnorm > 0 else 0.0,
        cosines=cos,
        projected_blocks=int(round(nchanged)),
        total_blocks=len(layout.blocks),
    )


def _coefficients(grads, basis: SubspaceBasis, layout: "Layout", device, subtract: bool) -> torch.Tensor:
    """U g for every block, concatenated (K,) in float32; with `subtract`, also g -= U^T (U g)."""
    pieces = []
    for block, k in zip(layout.blocks, layout.ranks):
        if k == 0:
            continue
        parts = [basis.directions[i] @ grads[i].reshape(-1) for i in block if grads[i] is not None]
        if not parts:
            pieces.append(torch.zeros(k, dtype=basis.directions[block[0]].dtype, device=device))
            continue
        c = parts[0] if len(parts) == 1 else torch.stack(parts).float().sum(dim=0)
        pieces.append(c)
        if subtract:
            for i in block:
                if grads[i] is not None:
                    grads[i].view(-1).addmv_(basis.directions[i].t(), c.to(grads[i].dtype), alpha=-1.0)
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.cat([p.float() for p in pieces]) if len({p.dtype for p in pieces}) > 1 else torch.cat(pieces).float()


def _subtract(grads, basis: SubspaceBasis, layout: "Layout", removed: torch.Tensor) -> None:
    """g_i <- g_i - U_i^T removed_b, in place on each gradient's storage."""
    offset = 0
    cast: dict[torch.dtype, torch.Tensor] = {}
    for block, k in zip(layout.blocks, layout.ranks):
        if k == 0:
            continue
        for i in block:
            g = grads[i]
            if g is None:
                continue
            if g.dtype not in cast:
                cast[g.dtype] = removed.to(g.dtype)
            g.view(-1).addmv_(basis.directions[i].t(), cast[g.dtype][offset : offset + k], alpha=-1.0)
        offset += k


def residual_cosines(grads: list[torch.Tensor | None], ref_grads: list[list[torch.Tensor]]) -> list[float]:
    """Whole-model cosine between `grads` and each reference gradient (for tests and checks)."""
    out = []
    for r in ref_grads:
        num, gn, rn = 0.0, 0.0, 0.0
        for g, t in zip(grads, r):
            t = t.double().reshape(-1)
            rn += float(t @ t)
            if g is not None:
                gg = g.double().reshape(-1)
                num += float(gg @ t)
                gn += float(gg @ gg)
        out.append(num / math.sqrt(gn * rn) if gn > 0 and rn > 0 else 0.0)
    return out
