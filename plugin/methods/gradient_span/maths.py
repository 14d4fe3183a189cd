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

Sharded gradients (ZeRO, FSDP2): every function below also takes `reduce`, a callable that sums a
float32 tensor over the ranks that hold the other pieces of each parameter (an all-reduce). Each
rank then passes only its own pieces (`grads[i]` and `directions[i]` restricted to the same slice
of parameter i); inner products are partial sums until `reduce` completes them, so every rank
makes the same decisions (ranks, gates) and subtracts U^T c from its own slice only.

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

# Low-precision inner products are upcast to float32 this many elements at a time, so the scratch
# is bounded (k rows x 2^24 x 4 bytes = 192 MB at k = 3) instead of a float32 copy of a whole
# embedding's rows (several GB for a 7B model).
UPCAST_CHUNK = 1 << 24

GRANULARITIES = ("tensor", "global")
MODES = ("project", "conflict", "observe")


class NonFiniteGradient(ValueError):
    """A reference gradient with a NaN or infinity (the caller names the set and the step)."""


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
    # fresh[b]: block b's leading rows that span this build's reference gradients; the rows after them
    # were carried from the previous build (`BasisBuilder(carry=...)`). None: every row is fresh.
    fresh: list[int] | None = None
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

    def fresh_rows(self) -> list[torch.Tensor]:
        """Per parameter, the rows spanning this build's own reference gradients (views, no copy):
        what the next build carries."""
        if self.fresh is None:
            return list(self.directions)
        keep = [self.fresh[b] for b, block in enumerate(self.blocks()) for _ in block]
        return [d[:k] for d, k in zip(self.directions, keep)]

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
            "fresh": None if self.fresh is None else list(self.fresh),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "SubspaceBasis":
        return cls(
            granularity=state["granularity"],
            directions=list(state["directions"]),
            coords=list(state["coords"]),
            ref_norms=state["ref_norms"],
            names=list(state.get("names", [])),
            fresh=state.get("fresh"),
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


def _mv(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """rows @ v with the inner products accumulated and returned in (at least) float32.

    float32/float64 storage goes straight to one matvec. Low-precision storage (bf16, fp16) would
    round each product sum to 8 or 11 bits, which for U theta of the weights is coarser than a
    step; it is upcast UPCAST_CHUNK columns at a time, so the scratch stays bounded.
    """
    if rows.dtype == torch.float32 and v.dtype == torch.float32:
        return torch.mv(rows, v)
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, v.numel(), UPCAST_CHUNK):
        stop = start + UPCAST_CHUNK
        out += torch.mv(rows[:, start:stop].float(), v[start:stop].float()).float()
    return out


def _sub_rows_(x: torch.Tensor, rows: torch.Tensor, c: torch.Tensor) -> None:
    """x -= rows^T c in place on x's storage (x flat, rows (k, x.numel()), c (k,) float32).

    One `addmv_` when the dtypes agree; a basis stored in another dtype than x (e.g.
    ogpsa_basis_dtype=bfloat16 with float32 gradients) is cast UPCAST_CHUNK columns at a time.
    """
    if rows.dtype == x.dtype:
        x.addmv_(rows.t(), c.to(x.dtype), alpha=-1.0)
        return
    c = c.to(x.dtype)
    for start in range(0, x.numel(), UPCAST_CHUNK):
        stop = start + UPCAST_CHUNK
        x[start:stop].addmv_(rows[:, start:stop].t().to(x.dtype), c, alpha=-1.0)


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


class BasisBuilder:
    """Streams reference gradients in, one set at a time, and orthonormalises them on arrival.

    Memory: the rows are preallocated in the gradient dtype (the basis itself) and each incoming
    gradient lands directly in the next free row (`next_row()`: autograd can accumulate into it as
    `.grad`), where it is orthogonalised in place (`commit()`). A rebuild thus holds the basis and
    nothing else, never m raw gradients or float32 copies of them (for a bf16 7B model that is
    42 GB instead of 84 GB at m = 3), and no gradient is ever copied.

    Block classical Gram-Schmidt run twice ("twice is enough": the second pass restores
    orthogonality to working precision even when reference gradients are nearly colinear, which
    one pass does not). Per pass and parameter tensor it is one matvec c = U v and one in-place
    `addmv_` v -= U^T c, i.e. two reads of the tensor's rows instead of 2k dot/axpy sweeps; for a
    block spread over many tensors the c's are summed over the block first, so no whole-model
    vector is ever concatenated. Inner products are float32 whatever the storage dtype; with bf16
    storage the rows are orthonormal to bf16 precision (~1e-3), the precision the gradients
    themselves have. All blocks are processed together, with two host syncs per reference set.
    """

    def __init__(
        self,
        like: list[torch.Tensor],
        max_rank: int,
        granularity: str = "tensor",
        rtol: float = RANK_RTOL,
        reduce=None,
        dtype: torch.dtype | None = None,
        carry: list[torch.Tensor | None] | None = None,
        carry_names: list[str] | None = None,
    ):
        """like[i]: a tensor with the numel, dtype and device of (this rank's piece of) parameter i.
        reduce: see the module docstring (None: each rank holds whole parameters). dtype: storage of
        the rows (None: each parameter's own dtype). max_rank: the reference gradients to come.

        carry[i]: (k_b, numel_i) orthonormal rows of an earlier basis (the previous build's
        `fresh_rows()`) that stay in the span beside the new gradients. They wait in the rows after
        max_rank and are orthogonalised against the new gradients in `finish`, so the first rows of
        each block still span exactly this build's gradients (`SubspaceBasis.fresh`). Each entry of
        `carry` is set to None once copied: a caller that holds no other reference frees the earlier
        rows parameter by parameter, so the build peaks at the new rows plus one parameter's old ones.

        carry_names: the carried rows are reference gradients kept from earlier builds (ogpsa_reference_rotation:
        the shares not read this time, `gradients_of`), not orthonormal rows: each is committed as one
        more named reference gradient, with its coordinates and norm, after this build's own. Every
        parameter then carries len(carry_names) rows.
        """
        self.granularity = granularity
        self.rtol = rtol
        self.reduce = reduce or _no_reduce
        self.blocks = block_layout(len(like), granularity)
        self.block_of = [b for b, block in enumerate(self.blocks) for _ in block]
        if carry is not None and len(carry) != len(like):
            raise ValueError(f"carry has {len(carry)} tensors, expected {len(like)}")
        # rows carried per block (every parameter of a block carries the same number)
        self.carried = [0 if carry is None or not block else int(carry[block[0]].shape[0]) for block in self.blocks]
        if carry_names is not None and set(self.carried) - {len(carry_names)}:
            raise ValueError(f"carry_names names {len(carry_names)} rows, the blocks carry {sorted(set(self.carried))}")
        self.carry_names = carry_names
        extra = max(self.carried, default=0)
        # rows[i][q] is row q of parameter i's slice; filled in place as directions are accepted.
        self.rows = []
        for i, t in enumerate(like):
            rows = torch.zeros((max_rank + extra, t.numel()), dtype=dtype or t.dtype, device=t.device)
            if carry is not None and carry[i] is not None and carry[i].shape[0]:
                rows[max_rank : max_rank + carry[i].shape[0]].copy_(carry[i].reshape(carry[i].shape[0], -1))
                carry[i] = None
            self.rows.append(rows)
        self.max_rank = max_rank
        self.rank = [0] * len(self.blocks)
        self.coeffs: list[list[list[float]]] = [[] for _ in self.blocks]  # per block, per set: <r_j, u_q>
        self.norms: list[float] = []
        self.names: list[str] = []

    def next_row(self) -> list[torch.Tensor]:
        """The zeroed flat buffers (one per parameter) that the next reference gradient goes into.

        Fill them (copy, or let autograd accumulate into `p.grad = buf.view_as(p)`), then `commit`.
        """
        if len(self.norms) >= self.max_rank:
            raise ValueError(f"more reference sets than max_rank={self.max_rank}")
        return self._row()

    def _row(self) -> list[torch.Tensor]:
        return [rows[self.rank[b]] for rows, b in zip(self.rows, self.block_of)]

    def add(self, grads: list[torch.Tensor], name: str = "") -> float:
        """Copy one reference gradient (one tensor per parameter) into the next row and `commit` it."""
        if len(grads) != len(self.rows):
            raise ValueError(f"reference gradient {name!r} has {len(grads)} tensors, expected {len(self.rows)}")
        torch._foreach_copy_(self.next_row(), [g.detach().reshape(-1) for g in grads])
        return self.commit(name)

    def commit(self, name: str = "", scale: float = 1.0, record: bool = True, carried: bool = False) -> float:
        """Orthogonalise the gradient held in `next_row()`, times `scale`, into the basis.

        `scale` is folded into the coefficients and the normalisation (a sum of token gradients is
        committed as their mean without a pass to rescale it). Returns the scaled gradient's
        whole-model norm. Raises `NonFiniteGradient` (leaving the builder as it was) if the gradient
        has a NaN or infinity. record=False: a carried row, which widens the span but is not a
        reference set (no coordinates, norm or name). carried: the row was moved into place by
        `_commit_carried` (counted beyond max_rank).
        """
        v = self.next_row() if record and not carried else self._row()
        ks = [self.rank[b] for b in self.block_of]
        sq0 = self.reduce(self._block_sq(v))
        if not bool(sq0.sum().isfinite()):  # one sync; checked before anything is changed
            torch._foreach_zero_(v)
            raise NonFiniteGradient(f"reference gradient {name!r} is not finite")
        coef: list[torch.Tensor | None] = [None] * len(self.blocks)
        for _ in range(2):  # CGS2
            c = self._reduce_blocks(self._block_coefficients(v, ks))
            coef = [ci if prev is None else prev + ci for prev, ci in zip(coef, c)]
            for i, (vi, k) in enumerate(zip(v, ks)):
                if k:
                    vi.addmv_(self.rows[i][:k].t(), c[self.block_of[i]].to(vi.dtype), alpha=-1.0)
        sq = self.reduce(self._block_sq(v))
        host = torch.cat([sq0, sq, *[c for c in coef if c is not None]]).tolist()  # the one sync
        nb = len(self.blocks)
        sq0_h, sq_h, flat = host[:nb], host[nb : 2 * nb], iter(host[2 * nb :])
        keep, drop, inv = [], [], []
        for b, block in enumerate(self.blocks):
            c_b = [next(flat) * scale for _ in range(self.rank[b])]
            norm = math.sqrt(sq_h[b])
            if sq0_h[b] > 0 and norm > self.rtol * math.sqrt(sq0_h[b]):
                keep += [v[i] for i in block]
                inv += [1.0 / norm] * len(block)
                c_b.append(norm * scale)
                self.rank[b] += 1
            else:  # dependent (or zero) on this block: nothing new to span
                drop += [v[i] for i in block]
            if record:
                self.coeffs[b].append(c_b)
        if keep:
            torch._foreach_mul_(keep, inv)
        if drop:
            torch._foreach_zero_(drop)
        norm = math.sqrt(sum(sq0_h)) * scale
        if record:
            self.norms.append(norm)
            self.names.append(name)
        return norm

    def _commit_carried(self) -> None:
        """Orthogonalise the carried rows against the new gradients (and each other), one row index
        at a time over all blocks: each moves down to its block's next free row, never past its own
        slot, so the move is in place. Every rank runs the same commits (the counts are global)."""
        for q in range(max(self.carried, default=0)):
            for i, b in enumerate(self.block_of):
                src, dst = self.max_rank + q, self.rank[b]
                if q < self.carried[b] and dst != src:
                    self.rows[i][dst].copy_(self.rows[i][src])
                    self.rows[i][src].zero_()
            if self.carry_names is None:
                self.commit(record=False, carried=True)
            else:
                self.commit(self.carry_names[q], carried=True)

    def _block_sq(self, v: list[torch.Tensor]) -> torch.Tensor:
        """(num_blocks,) float32 squared norms of a row, summed per block (on the rows' device)."""
        device = self.rows[0].device if self.rows else "cpu"
        out = torch.zeros(len(self.blocks), dtype=torch.float32, device=device)
        if v:
            norms = torch.stack(torch._foreach_norm(v, 2, dtype=torch.float32))
            index = torch.tensor(self.block_of, dtype=torch.long, device=device)
            out.index_add_(0, index, norms.square())
        return out

    def _reduce_blocks(self, coefs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Complete the per-block partial inner products over the shard group (one reduce call)."""
        kept = [c for c in coefs if c is not None]
        if not kept or self.reduce is _no_reduce:
            return coefs
        flat = iter(self.reduce(torch.cat([c.float() for c in kept])).split([c.numel() for c in kept]))
        return [None if c is None else next(flat) for c in coefs]

    def _block_coefficients(self, v: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor | None]:
        """Per block, U_b v_b as a float32 (k_b,) tensor (None for a block with no rows yet)."""
        out: list[torch.Tensor | None] = []
        for block in self.blocks:
            parts = [_mv(self.rows[i][: ks[i]], v[i]) for i in block if ks[i]]
            out.append(None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0))
        return out

    def finish(self) -> SubspaceBasis:
        """The basis: each parameter's rows cut to its block rank (views, no copy), the carried rows
        after this build's own."""
        fresh = list(self.rank)
        if any(self.carried):
            self._commit_carried()
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
        return SubspaceBasis(self.granularity, directions, coords, ref_norms, list(self.names),
                             fresh=fresh if any(self.carried) else None)


@torch.no_grad()
def gradients_of(basis: SubspaceBasis, keep: list[int]) -> list[torch.Tensor]:
    """The reference gradients `keep` (indices into basis.names) as they were committed, one
    (len(keep), numel_i) tensor per parameter in the rows' dtype: r_j restricted to block b is
    coords[b][j] @ U_b, exact up to what the builder dropped as dependent (below RANK_RTOL of r_j).

    Consumes the basis: each parameter's rows are released (`basis.directions[i]` set to an empty
    tensor) as soon as its gradients are formed, so a caller that holds no other reference to the
    basis peaks at one parameter's old rows beside what was formed so far, never two whole bases.
    Products are accumulated in float32, UPCAST_CHUNK columns at a time for low-precision rows.
    """
    out = []
    for b, block in enumerate(basis.blocks()):
        c = basis.coords[b][keep]  # (len(keep), k_b) float32
        for i in block:
            d = basis.directions[i]
            rows = torch.zeros((len(keep), d.shape[1]), dtype=d.dtype, device=d.device)
            if d.shape[0] and len(keep):
                cd = c.to(d.device)
                for start in range(0, d.shape[1], UPCAST_CHUNK):
                    stop = start + UPCAST_CHUNK
                    rows[:, start:stop] = (cd @ d[:, start:stop].float()).to(d.dtype)
            basis.directions[i] = d.new_zeros((0, d.shape[1]))
            del d
            out.append(rows)
    basis.directions = []  # nothing is left of the rows
    return out


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
    reference gradient j (whole-model); projected_blocks: blocks that were changed; dots[j]: the raw
    <g, r_j> and ref_norms[j]: |r_j|, so that `merge` can combine calls over disjoint parameters.
    """

    grad_norm: float
    removed_norm: float
    removed_fraction: float
    cosines: list[float]
    projected_blocks: int
    total_blocks: int
    dots: list[float] = field(default_factory=list)
    ref_norms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, grad_sq: float, removed_sq: float, dots: list[float], ref_norms: list[float], projected: int,
           total: int) -> "ProjectionStats":
        gnorm, rnorm = math.sqrt(max(grad_sq, 0.0)), math.sqrt(max(removed_sq, 0.0))
        cosines = [d / (gnorm * n) if gnorm > 0 and n > 0 else 0.0 for d, n in zip(dots, ref_norms)]
        return cls(gnorm, rnorm, rnorm / gnorm if gnorm > 0 else 0.0, cosines, projected, total, dots, ref_norms)

    @classmethod
    def merge(cls, parts: list["ProjectionStats"]) -> "ProjectionStats":
        """One step's statistics from calls over disjoint sets of parameters (e.g. ZeRO's groups)."""
        if len(parts) == 1:
            return parts[0]
        dots = [sum(col) for col in zip(*(p.dots for p in parts))]
        return cls.of(
            sum(p.grad_norm**2 for p in parts),
            sum(p.removed_norm**2 for p in parts),
            dots,
            parts[0].ref_norms,
            sum(p.projected_blocks for p in parts),
            parts[0].total_blocks,
        )


@torch.no_grad()
def project_(
    grads: list[torch.Tensor | None], basis: SubspaceBasis, mode: str = "project", reduce=None
) -> ProjectionStats:
    """Remove the in-subspace component of `grads` in place; return what was removed.

    grads[i] is parameter i's gradient (same order as the basis; None counts as zero and is left
    None, and a block with no gradient at all counts as absent). mode: "project" removes U^T U g
    from every block; "conflict" only from blocks where <g, r_j> < 0 for some reference set j;
    "observe" measures and changes nothing. reduce: see the module docstring.

    Cost: per parameter one matvec U_i g_i and one in-place `addmv_` on the `.grad` storage (the
    fewest bytes: U is read twice, g read twice and written once); everything else (conflict
    gates, cosines, norms) is a handful of vector ops over all blocks at once, so the number of
    kernel launches is 2P + O(1), not O(P) per statistic. No host/device copies: one `.tolist()`
    at the end brings the metrics back; with `reduce`, one collective before it. Coefficients are
    accumulated in float32 whatever the storage dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(grads) != len(basis.directions):
        raise ValueError(f"got {len(grads)} gradients for a basis over {len(basis.directions)} parameters")
    present = [g for g in grads if g is not None]
    device = present[0].device if present else basis.ref_norms.device
    layout = basis.layout()
    # "project" removes every block's component whatever the statistics say, so without sharding
    # each block is subtracted right after its coefficients are formed: with tensor granularity U_i
    # and g_i are then still in cache (GPU L2) for the second pass, which roughly halves the DRAM
    # traffic. Sharded coefficients are partial sums until reduced, so they subtract afterwards.
    eager = mode == "project" and reduce is None
    grad_sq = _sq_norm(present, device) if not eager else None  # the raw gradient, before any change
    coef = _coefficients(grads, basis, layout, device, subtract=eager)  # (K,) fp32: U g per block
    if eager:
        grad_sq = _sq_norm(present, device) + coef.square().sum()  # |g_raw|^2 = |g_new|^2 + |U g|^2
    live = _present_blocks(grads, layout, device)
    if reduce is not None:
        coef, grad_sq, live = _split(reduce(torch.cat([coef, grad_sq.reshape(1), live])), coef.numel(), 1)
        grad_sq = grad_sq.reshape(())
    live = (live > 0).float()
    block_dots = _block_dots(layout, coef)
    if mode == "project":
        gate = live
    elif mode == "conflict":
        gate = (block_dots < 0).any(dim=0).float() * live
    else:
        gate = torch.zeros(layout.num_blocks, dtype=torch.float32, device=device)
    removed = coef * gate[layout.col_block]
    if not eager and mode != "observe":
        _subtract(grads, basis, layout, removed)
    packed = torch.cat([grad_sq.reshape(1), removed.square().sum().reshape(1),
                        (gate * layout.has_rank).sum().reshape(1), block_dots.sum(dim=1)])
    gsq, rsq, nchanged, *dots = packed.tolist()
    return ProjectionStats.of(gsq, rsq, dots, basis.ref_norms.tolist(), int(round(nchanged)), len(layout.blocks))


@torch.no_grad()
def span_coordinates(tensors: list[torch.Tensor | None], basis: SubspaceBasis, reduce=None) -> torch.Tensor:
    """U x for every block, (K,) float32: the coordinates of `tensors` (e.g. the weights) in the basis."""
    present = [t for t in tensors if t is not None]
    device = present[0].device if present else basis.ref_norms.device
    coef = _coefficients(tensors, basis, basis.layout(), device, subtract=False)
    return coef if reduce is None else reduce(coef)


@torch.no_grad()
def project_change_(
    tensors: list[torch.Tensor | None], basis: SubspaceBasis, before: torch.Tensor, mode: str = "project", reduce=None
) -> tuple[float, torch.Tensor]:
    """Remove the in-span part of the change of `tensors` since their coordinates were `before`.

    For the weights around an optimizer step: with d = theta_new - theta_old, U d = U theta_new -
    U theta_old, and theta_new <- theta_new - U^T U d leaves the step d orthogonal to every
    reference gradient whatever the optimizer did to the gradient. No copy of the old weights is
    kept, only the K coordinates; and since a projected step leaves them unchanged, the returned
    coordinates can be passed as `before` of the next step, so `span_coordinates` runs once per
    basis, not per step (one matvec and one `addmv_` per tensor per step, as `project_`). Rounding
    drift is corrected on the next step rather than accumulated. The difference U theta_new -
    before cancels the weights' common part, so the removal is exact to about eps * |theta| / |d|
    of the in-span part (fp32: ~1e-3 at a 1e-4 relative step; bf16 weights cannot resolve such
    steps at all, so use fp32 master weights). Tensors given as None are left alone; `before`
    must then be the coordinates of the same selection (zero on blocks with no tensor).

    "conflict" removes it only from blocks whose step raises some reference loss to first order
    (<d, r_j> > 0); "observe" changes nothing. Returns (norm of the step's in-span part, which
    "project" removes; the coordinates of `tensors` after the call).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layout = basis.layout()
    present = [t for t in tensors if t is not None]
    device = present[0].device if present else basis.ref_norms.device
    # "project" subtracts each block right after its coordinates are formed, as `project_` does
    # (its rows are then still in cache for the second pass); the other modes, and sharded
    # tensors (partial sums until reduced), need all of them first.
    eager = mode == "project" and reduce is None
    now = _coefficients(tensors, basis, layout, device, subtract=eager, minus=before if eager else None)
    if reduce is not None:
        now = reduce(now)
    delta = now - before  # (K,) U d per block
    in_span = float(delta.norm())
    if eager:
        return in_span, before  # U^T (now - before) was removed: the coordinates are back at `before`
    if mode == "observe":
        return in_span, now
    if mode == "conflict":
        delta = delta * (_block_dots(layout, delta) > 0).any(dim=0).float()[layout.col_block]
    _subtract(tensors, basis, layout, delta)
    return in_span, now - delta


def _split(t: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """t cut into pieces of the given sizes, the rest last."""
    return list(t.split([*sizes, t.numel() - sum(sizes)]))


def _sq_norm(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """float32 squared norm of a list of tensors (0-d)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(tensors)).float().square().sum()


def _present_blocks(grads, layout: "Layout", device) -> torch.Tensor:
    """(num_blocks,) float32: 1.0 where the block has at least one gradient in `grads`."""
    flags = [float(any(grads[i] is not None for i in block)) for block in layout.blocks] or [0.0]
    return torch.tensor(flags, dtype=torch.float32, device=device)


def _block_dots(layout: "Layout", coef: torch.Tensor) -> torch.Tensor:
    """(m, num_blocks) float32 <x_b, r_j|b> for every reference set j and block b, from the (K,)
    block coordinates `coef` of x: r_j restricted to b is coords[b][j] @ U_b, so no pass over x."""
    out = torch.zeros((layout.coords.shape[0], layout.num_blocks), dtype=torch.float32, device=coef.device)
    return out.index_add_(1, layout.col_block, layout.coords * coef)


def _coefficients(grads, basis: SubspaceBasis, layout: "Layout", device, subtract: bool, minus=None) -> torch.Tensor:
    """U g for every block, concatenated (K,) in float32; with `subtract`, also g -= U^T (U g - minus)
    block by block (`minus`: (K,) float32 coordinates to keep, None for zero)."""
    pieces = []
    offset = 0
    for block, k in zip(layout.blocks, layout.ranks):
        if k == 0:
            continue
        parts = [_mv(basis.directions[i], grads[i].reshape(-1)) for i in block if grads[i] is not None]
        c = torch.stack(parts).sum(dim=0) if len(parts) > 1 else parts[0] if parts else None
        pieces.append(c if c is not None else torch.zeros(k, dtype=torch.float32, device=device))
        if subtract and c is not None:
            # the difference is taken in float32: for the weights, U theta_new - U theta_old cancels
            # their common part, which the storage dtype (bf16) could not resolve
            r = c if minus is None else c - minus[offset : offset + k]
            for i in block:
                if grads[i] is not None:
                    _sub_rows_(grads[i].view(-1), basis.directions[i], r)
        offset += k
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.cat(pieces)


def _subtract(grads, basis: SubspaceBasis, layout: "Layout", removed: torch.Tensor) -> None:
    """g_i <- g_i - U_i^T removed_b, in place on each gradient's storage."""
    offset = 0
    for block, k in zip(layout.blocks, layout.ranks):
        if k == 0:
            continue
        for i in block:
            if grads[i] is not None and grads[i].numel():
                _sub_rows_(grads[i].view(-1), basis.directions[i], removed[offset : offset + k])
        offset += k


@torch.no_grad()
def basis_fingerprint(basis: SubspaceBasis, rows: bool = True) -> torch.Tensor:
    """A float64 scalar that changes with any change of the basis: the sums of the coordinates and
    reference norms and, with `rows`, of every row's entries (accumulated in float32, no copy)."""
    device = basis.ref_norms.device
    parts = [basis.ref_norms.sum()] + [c.sum() for c in basis.coords]
    if rows:
        parts += [_mv(d, torch.ones(d.shape[1], dtype=d.dtype, device=d.device)).sum()
                  for d in basis.directions if d.shape[0]]
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in parts]).sum()


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
