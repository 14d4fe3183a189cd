"""Null-space projection math (NSPO, arXiv 2512.11391): pure tensor code, torch only.

The second method beside the gradient span's `methods/gradient_span/maths.py`. For a linear layer y = W x whose inputs
on the reference data are the rows of X (n x d_in), the uncentred covariance C = X^T X has
eigenpairs (lambda_i, v_i). The null space N is spanned by the v_i with lambda_i <= alpha *
lambda_max; P = V_N V_N^T projects onto it. A weight change restricted to N (dW = dW P) leaves
the layer's outputs on the reference inputs almost exactly in place, not only to first order:

    || dW X^T ||_F = || (dW V_N) (V_N^T X^T) ||_F <= ||dW||_2 * sqrt(sum of the null eigenvalues)
                                                  <= ||dW||_2 * sqrt(k_N * alpha * lambda_max)

since || V_N^T X^T ||_F^2 = trace(V_N^T C V_N) is the sum of the eigenvalues in N. Applied to the
layer's weight under full fine-tuning, and to a LoRA adapter's A (B A x then ignores the reference
inputs' range once A = A P).

State and transform are kept apart, as in the gradient span's maths: `build_space` turns a covariance into a
`LayerSpace` (the state, with `state_dict`), and `project_rows_` / `anchor` / `restore_` apply it.
Each `LayerSpace` stores whichever of the null basis V_N and the range basis V_R = V_N's
complement is narrower: P = V_N V_N^T = I - V_R V_R^T, so either gives the same projection, at
min(k_N, d_in - k_N) x d_in floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerSpace:
    """One input space's null space (shared by the layers that read the same input, e.g. gate and up).

    vectors: (d_in, k) float32 orthonormal columns, the null basis (kind "null") or the range basis
        (kind "range"), whichever has fewer columns.
    null_dim: k_N, the null space's dimension (0: the layer is frozen; d_in: unconstrained).
    null_energy: sum of the null eigenvalues / sum of all: the part of the reference inputs'
        energy a change in the null space may still reach (the bound above, squared, relative).
    largest: lambda_max, the scale the threshold alpha is relative to.
    threshold: the largest eigenvalue of a direction admitted to the null space (0 when none is): the
        most energy per unit of weight change a null-space direction may reach (`adapter_space`).
    """

    kind: str
    vectors: torch.Tensor
    null_dim: int
    null_energy: float
    largest: float
    threshold: float = 0.0

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "vectors": self.vectors, "null_dim": self.null_dim,
                "null_energy": self.null_energy, "largest": self.largest, "threshold": self.threshold}

    @classmethod
    def from_state_dict(cls, state: dict) -> LayerSpace:
        return cls(state["kind"], state["vectors"], int(state["null_dim"]), float(state["null_energy"]),
                   float(state["largest"]), float(state.get("threshold", 0.0)))


def protected_count(eigenvalues: torch.Tensor, energy: float) -> int:
    """The fewest top eigenvalues (of C, clamped >= 0, any order) whose sum reaches `energy` x the total:
    GPM's energy criterion (Saha et al., ICLR 2021), ||X_k||_F^2 >= energy ||X||_F^2.

    The energy left free is at least d * eps32 * total: C is a float32 sum, so each eigenvalue is
    known only to about eps32 * lambda_max, and the directions no input reaches carry round-off
    eigenvalues of that size. Energy 1 thus protects the numerical range, not those directions too;
    below 1 - d * eps32 (1 - 5e-4 at d = 4096) the criterion is GPM's exactly.
    """
    values = eigenvalues.to(torch.float64).sort(descending=True).values
    total = float(values.sum())
    if energy <= 0 or total <= 0:
        return 0
    need = min(energy * total, total - values.numel() * torch.finfo(torch.float32).eps * total)
    reached = values.cumsum(0) >= need
    return int(reached.to(torch.int8).argmax()) + 1


def build_space(cov: torch.Tensor, alpha: float, free_input: bool = False, energy: float | None = None
                ) -> LayerSpace:
    """The null space of one input covariance C = X^T X (d_in x d_in, symmetric positive semi-definite).

    energy: None keeps the eigenvalues <= alpha * lambda_max (NSPO); a fraction keeps in the null
    space all but the fewest top directions holding that fraction of C's trace (`protected_count`).

    The eigendecomposition runs in float64 on C's device: the threshold alpha * lambda_max (5e-5 by
    default) is within two orders of magnitude of float32 eigensolver error (about d_in * 6e-8 *
    lambda_max at d_in in the thousands), which would move directions across the threshold at
    random. The kept basis is stored in float32: the projection's own round-off (~1e-7) is far below
    alpha. free_input: release C's storage once its float64 copy exists (the caller is done with it),
    so the eigendecomposition holds 8 + 8 + 16 bytes per entry (C in float64, the eigenvectors,
    LAPACK's workspace) and not 4 more.
    """
    c = cov.to(torch.float64)
    if free_input:
        cov.set_()  # drops the float32 storage (no other tensor shares it)
    # eigh reads only the lower triangle: the float32 sums' asymmetry (their last bits) is the same
    # round-off as the sums' own, and averaging the triangles would cost two more float64 copies
    eigenvalues, eigenvectors = torch.linalg.eigh(c)  # ascending
    del c
    # C is PSD; negative eigenvalues are round-off around zero, i.e. directions no input reaches.
    eigenvalues = eigenvalues.clamp_min(0.0)
    largest = float(eigenvalues[-1]) if eigenvalues.numel() else 0.0
    # ascending: the null directions come first. alpha = 0 means frozen: a rank-deficient C has
    # round-off eigenvalues around zero (some clamped to exactly 0) that `<= 0` would let through
    if energy is not None:
        k = eigenvalues.numel() - protected_count(eigenvalues, energy)
    else:
        null = eigenvalues <= alpha * largest if alpha > 0 else torch.zeros_like(eigenvalues, dtype=torch.bool)
        k = int(null.sum())
    total = float(eigenvalues.sum())
    energy = float(eigenvalues[:k].sum()) / total if total > 0 else 0.0
    threshold = float(eigenvalues[k - 1]) if k > 0 else 0.0
    d = eigenvectors.shape[0]
    if k <= d - k:
        kind, vectors = "null", eigenvectors[:, :k]
    else:
        kind, vectors = "range", eigenvectors[:, k:]
    return LayerSpace(kind, vectors.to(torch.float32).contiguous(), k, energy, largest, threshold)


def adapter_space(gram: torch.Tensor, rows: torch.Tensor, threshold: float) -> LayerSpace:
    """The directions of a trained LoRA adapter's rank space in which B may still move after a rebuild.

    With the effective update s B A kept as it is at a rebuild (B has moved, so A <- A P would change
    the model), a later change keeps the layer's outputs on the new reference inputs (covariance C)
    only as far as d(B A) does. A's gradient is projected onto the new null space (dA = dA P), so
    B dA is held as a weight change under full fine-tuning is. B's change dB reaches the reference
    inputs through A: a change d u^T (u in the r-dimensional rank space) moves the weight by
    d (u^T A) and the outputs on the reference inputs by ||d||^2 u^T (A C A^T) u, against the
    ||d||^2 u^T (A A^T) u it moves the weight. The generalised eigenvectors u of
    (gram = A C A^T, rows = A A^T) with eigenvalue mu <= `threshold` (the null space's own cut: no
    more reference energy per unit of weight change than a null-space direction) are free, as are
    the u with u^T A = 0 (they move nothing); B's rows are projected onto their span (orthonormalised)
    and its other directions keep their values, so what B has learnt there stays.

    Returns the span as a "null" `LayerSpace` over the rank space (r x f vectors, null_dim f;
    null_energy: the fraction of A C A^T's trace along the free directions).
    """
    g = gram.to(torch.float64)
    h = rows.to(torch.float64)
    g, h = (g + g.T) / 2, (h + h.T) / 2
    r = h.shape[0]
    hv, hq = torch.linalg.eigh(h)
    top = float(hv[-1]) if r else 0.0
    reached = hv > max(top, 0.0) * r * torch.finfo(torch.float32).eps  # A's rows span these (float32 A)
    whiten = hq[:, reached] / hv[reached].sqrt()  # rows^(-1/2) on A's row span
    mu, y = torch.linalg.eigh(whiten.T @ g @ whiten)
    free = torch.cat([hq[:, ~reached], whiten @ y[:, mu <= threshold]], dim=1)
    q = torch.linalg.qr(free).Q if free.shape[1] else free
    total = float(mu.clamp_min(0).sum())
    energy = float(mu[mu <= threshold].clamp_min(0).sum()) / total if total > 0 else 0.0
    return LayerSpace("null", q.to(torch.float32).contiguous(), q.shape[1], energy, float(mu.max()) if mu.numel()
                      else 0.0, threshold)


def _times_basis(mat: torch.Tensor, space: LayerSpace) -> torch.Tensor:
    """(M V) (V^T), the part of M's rows in the stored basis' span, in M's dtype (float32 math for
    low-precision M: a bf16 product would round the projection coefficients to 3 digits)."""
    v = space.vectors.to(mat.device)
    if mat.dtype in (torch.float32, torch.float64):
        v = v.to(mat.dtype)
        return (mat @ v) @ v.T
    return ((mat.float() @ v) @ v.T).to(mat.dtype)


def project_rows_(mat: torch.Tensor, space: LayerSpace) -> float:
    """M <- M P in place (each row of M, a d_in vector, onto the null space); return ||M (I - P)||_F,
    the norm removed. M: a weight, its gradient, or a LoRA A (rows x d_in)."""
    # an empty basis (P = 0 as a null basis, P = I as a range basis) needs no case of its own: the
    # products with a d x 0 matrix are exact zeros
    part = _times_basis(mat, space)
    if space.kind == "range":
        mat.sub_(part)  # M (I - V_R V_R^T)
        return float(part.float().norm())
    removed = float((mat.float() - part.float()).norm())
    mat.copy_(part)  # M V_N V_N^T
    return removed


def anchor(weight: torch.Tensor, space: LayerSpace) -> torch.Tensor:
    """What a constrained weight must keep: its part outside the null space, W (I - P).

    Stored compactly where it can be: for a range basis, as coordinates W V_R (rows x k_R, k_R <=
    d_in / 2); for a null basis, as the full W - (W V_N) V_N^T (rows x d_in; the null basis is the
    narrower one only when most input directions are protected, which is what the anchor is for).
    """
    w = weight.detach()
    if space.kind == "range":
        return (w.float() @ space.vectors.to(w.device)).contiguous()
    return (w.float() - _times_basis(w, space).float()).contiguous()


def restore_(weight: torch.Tensor, space: LayerSpace, kept: torch.Tensor) -> float:
    """After an optimizer step: W <- W P + (what `anchor` kept), so the step the optimizer actually
    took (Adam's per-coordinate rescaling and weight decay included) is restricted to the null space.
    Returns ||dW (I - P)||_F, the norm of the step's part that was removed."""
    w = weight.data
    if space.kind == "range":
        v = space.vectors.to(w.device)
        drift = w.float() @ v - kept  # (W - W_0) V_R: the step's range coordinates
        w.sub_((drift @ v.T).to(w.dtype))
        return float(drift.norm())
    null_part = _times_basis(w, space).float()
    old = w.float()
    new = kept + null_part
    removed = float((old - new).norm())
    w.copy_(new.to(w.dtype))
    return removed



# ---- flat partitions (DeepSpeed ZeRO) ------------------------------------------------------------
@dataclass(frozen=True)
class RowCut:
    """Where this rank's piece of a (rows x d) matrix lies when the matrix is flattened and cut at
    arbitrary elements (ZeRO's flat partitions): elements [start, stop) of the row-major matrix.

    Such a piece holds whole rows, which project on their own, and at most a partial row at each end.
    `split` lists the rows that any rank's piece cuts (the same tuple on every rank, from every rank's
    piece: `split_rows`); their parts are summed over ranks into whole rows (zeros where a rank holds
    nothing), projected whole by every rank alike, and each rank takes its part back.
    """

    d: int
    start: int
    stop: int
    split: tuple[int, ...]

    def whole(self) -> tuple[int, int, int]:
        """(first, end, offset): the rows [first, end) this piece holds whole, from element `offset` of it."""
        first = -(-self.start // self.d)
        end = max(first, self.stop // self.d)
        return first, end, first * self.d - self.start

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(slot in `split`, first column, end column, offset in the piece) of each partial row held."""
        if self.stop <= self.start:
            return []
        out = []
        for row in sorted({self.start // self.d, (self.stop - 1) // self.d}):
            lo, hi = max(self.start, row * self.d), min(self.stop, (row + 1) * self.d)
            if hi - lo < self.d:
                out.append((self.split.index(row), lo - row * self.d, hi - row * self.d, lo - self.start))
        return out


def split_rows(pieces: list[tuple[int, int]], d: int) -> tuple[int, ...]:
    """The rows of a (rows x d) matrix that the ranks' pieces [start, stop) cut, in order."""
    return tuple(sorted({b // d for start, stop in pieces if stop > start for b in (start, stop) if b % d}))


def _whole_rows(flat: torch.Tensor, cut: RowCut) -> torch.Tensor | None:
    first, end, offset = cut.whole()
    return flat[offset : offset + (end - first) * cut.d].view(end - first, cut.d) if end > first else None


def _gather_split(flat: torch.Tensor | None, cut: RowCut, reduce, device) -> torch.Tensor:
    """The cut rows whole, on every rank: each rank's parts summed in float32 (one `reduce`, the same
    shape on every rank, a rank holding none of the matrix included)."""
    full = torch.zeros(len(cut.split), cut.d, dtype=torch.float32, device=device)
    if flat is not None:
        for slot, c0, c1, offset in cut.segments():
            full[slot, c0:c1] = flat[offset : offset + c1 - c0].float()
    return reduce(full)


def _put_back(flat: torch.Tensor | None, cut: RowCut, full: torch.Tensor) -> float:
    """Copy this rank's parts of the (projected) cut rows back; returns their squared change."""
    changed = 0.0
    if flat is not None:
        for slot, c0, c1, offset in cut.segments():
            part = flat[offset : offset + c1 - c0]
            new = full[slot, c0:c1]
            changed += float((part.float() - new).norm()) ** 2
            part.copy_(new.to(part.dtype))
    return changed


def project_piece_(flat: torch.Tensor | None, cut: RowCut, space: LayerSpace, reduce, device) -> float:
    """`project_rows_` on this rank's flat piece (None: it holds none); returns the squared norm removed
    from its own elements (the ranks' parts add up to the matrix's)."""
    removed = 0.0
    rows = None if flat is None else _whole_rows(flat, cut)
    if rows is not None:
        removed += project_rows_(rows, space) ** 2
    if cut.split:
        full = _gather_split(flat, cut, reduce, device)
        project_rows_(full, space)
        removed += _put_back(flat, cut, full)
    return removed


def anchor_piece(flat: torch.Tensor | None, cut: RowCut, space: LayerSpace, reduce, device) -> tuple:
    """`anchor` of this rank's whole rows, and of the cut rows whole (every rank keeps those)."""
    rows = None if flat is None else _whole_rows(flat, cut)
    kept_rows = anchor(rows, space) if rows is not None else None
    kept_split = anchor(_gather_split(flat, cut, reduce, device), space) if cut.split else None
    return kept_rows, kept_split


def restore_piece_(flat: torch.Tensor | None, cut: RowCut, space: LayerSpace, kept: tuple, reduce, device) -> float:
    """`restore_` on this rank's flat piece; returns the squared norm of its own elements' removed part."""
    removed = 0.0
    rows = None if flat is None else _whole_rows(flat, cut)
    if rows is not None:
        removed += restore_(rows, space, kept[0]) ** 2
    if cut.split:
        full = _gather_split(flat, cut, reduce, device)
        restore_(full, space, kept[1])
        removed += _put_back(flat, cut, full)
    return removed
