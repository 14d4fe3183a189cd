"""The projection math (pure tensors): orthogonality, idempotence, identity, conflict mode, granularities."""

import doctest

import pytest
import torch

from ogpsa.plugin.methods.gradient_span import maths as projection
from ogpsa.plugin.methods.gradient_span.maths import (
    BasisBuilder,
    NonFiniteGradient,
    SubspaceBasis,
    build_basis,
    project_,
    project_change_,
    residual_cosines,
    span_coordinates,
)

SHAPES = [(7, 5), (11,), (3, 4, 2), (1,)]


def rand_grads(gen, scale=1.0):
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def block_slices(granularity):
    sizes = [torch.Size(s).numel() for s in SHAPES]
    if granularity == "global":
        return [slice(0, sum(sizes))]
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def test_docstring_example_runs():
    assert doctest.testmod(projection).failed == 0


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_projected_gradient_orthogonal_to_every_reference(granularity):
    gen = torch.Generator().manual_seed(0)
    refs = [rand_grads(gen) for _ in range(3)]
    basis = build_basis(refs, granularity)
    g = rand_grads(gen, scale=10.0)
    raw = flat(g).clone()
    project_(g, basis)
    gf = flat(g)
    for sl in block_slices(granularity):
        for r in refs:
            rf = flat(r)[sl]
            # relative residual of <g', r_j> on each block, fp32
            assert abs(float(gf[sl] @ rf)) / (float(raw[sl].norm()) * float(rf.norm())) <= 1e-6
    assert all(abs(c) < 1e-6 for c in residual_cosines(g, refs))


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_projection_is_idempotent_and_basis_orthonormal(granularity):
    gen = torch.Generator().manual_seed(1)
    refs = [rand_grads(gen) for _ in range(3)]
    basis = build_basis(refs, granularity)
    for sl_i, sl in enumerate(block_slices(granularity)):
        rows = torch.cat([d for d in (basis.directions[i] for i in ([sl_i] if granularity == "tensor" else range(len(SHAPES))))], dim=1)
        eye = rows @ rows.T
        assert torch.allclose(eye, torch.eye(eye.shape[0]), atol=1e-6)
    g = rand_grads(gen)
    project_(g, basis)
    once = flat(g).clone()
    stats = project_(g, basis)
    assert torch.allclose(flat(g), once, atol=1e-6 * float(once.norm()))
    assert stats.removed_fraction < 1e-6


def test_global_and_tensor_granularity_differ():
    gen = torch.Generator().manual_seed(2)
    refs = [rand_grads(gen) for _ in range(2)]
    g = rand_grads(gen)
    g_t, g_g = [t.clone() for t in g], [t.clone() for t in g]
    project_(g_t, build_basis(refs, "tensor"))
    project_(g_g, build_basis(refs, "global"))
    # tensor granularity removes more (a 2-dim subspace per tensor instead of 2 dims overall)
    assert flat(g_t).norm() < flat(g_g).norm()
    # global result is orthogonal to the whole-model reference vectors but not per tensor
    assert abs(float(flat(g_g) @ flat(refs[0]))) < 1e-5
    assert abs(float(g_g[0].reshape(-1) @ refs[0][0].reshape(-1))) > 1e-3


def test_empty_basis_is_identity():
    gen = torch.Generator().manual_seed(3)
    zero_refs = [[torch.zeros(s) for s in SHAPES]]
    basis = build_basis(zero_refs, "global")
    assert basis.rank() == 0
    g = rand_grads(gen)
    before = flat(g).clone()
    stats = project_(g, basis)
    assert torch.equal(flat(g), before)
    assert stats.removed_norm == 0.0


def test_dependent_reference_sets_are_dropped():
    gen = torch.Generator().manual_seed(4)
    r = rand_grads(gen)
    twice = [r, [2.0 * t for t in r], rand_grads(gen)]
    basis = build_basis(twice, "global")
    assert basis.rank() == 2  # the duplicate adds no direction
    # coordinates reproduce every reference gradient (including the duplicate)
    rows = torch.cat(basis.directions, dim=1)
    for j, ref in enumerate(twice):
        assert torch.allclose(basis.coords[0][j] @ rows, flat(ref), atol=1e-5)


def test_conflict_mode_leaves_non_conflicting_gradients_untouched():
    r1 = [torch.tensor([1.0, 0.0, 0.0])]
    r2 = [torch.tensor([0.0, 1.0, 0.0])]
    basis = build_basis([r1, r2], "global")
    agree = [torch.tensor([1.0, 2.0, 3.0])]  # <g, r1> > 0 and <g, r2> > 0
    stats = project_(agree, basis, "conflict")
    assert torch.equal(agree[0], torch.tensor([1.0, 2.0, 3.0]))
    assert stats.projected_blocks == 0 and stats.removed_fraction == 0.0
    conflict = [torch.tensor([1.0, -2.0, 3.0])]  # <g, r2> < 0: the step would raise L_2
    stats = project_(conflict, basis, "conflict")
    assert torch.allclose(conflict[0], torch.tensor([0.0, 0.0, 3.0]))
    assert stats.projected_blocks == 1


def test_conflict_mode_is_per_tensor_with_tensor_granularity():
    refs = [[torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]]
    basis = build_basis(refs, "tensor")
    g = [torch.tensor([-1.0, 5.0]), torch.tensor([3.0, 4.0])]  # first tensor conflicts, second agrees
    project_(g, basis, "conflict")
    assert torch.allclose(g[0], torch.tensor([0.0, 5.0]))
    assert torch.equal(g[1], torch.tensor([3.0, 4.0]))


def test_observe_mode_changes_nothing_but_measures():
    gen = torch.Generator().manual_seed(5)
    refs = [rand_grads(gen)]
    g = [t.clone() for t in refs[0]]
    stats = project_(g, build_basis(refs, "global"), "observe")
    assert torch.equal(flat(g), flat(refs[0]))
    assert stats.cosines[0] == pytest.approx(1.0, abs=1e-6)


def test_stats_match_direct_computation():
    gen = torch.Generator().manual_seed(6)
    refs = [rand_grads(gen) for _ in range(2)]
    g = rand_grads(gen)
    raw = flat(g).clone()
    expected_cos = residual_cosines(g, refs)
    stats = project_(g, build_basis(refs, "global"))
    assert stats.cosines == pytest.approx(expected_cos, abs=1e-5)
    assert stats.grad_norm == pytest.approx(float(raw.norm()), rel=1e-5)
    assert stats.removed_norm == pytest.approx(float((raw - flat(g)).norm()), rel=1e-4)


def test_none_gradients_are_skipped():
    gen = torch.Generator().manual_seed(7)
    refs = [rand_grads(gen)]
    g = rand_grads(gen)
    g[1] = None
    project_(g, build_basis(refs, "tensor"))
    assert g[1] is None


def test_nearly_colinear_references_stay_orthonormal():
    gen = torch.Generator().manual_seed(8)
    r = rand_grads(gen)
    eps = [1e-3 * t for t in rand_grads(gen)]
    refs = [r, [a + b for a, b in zip(r, eps)]]
    basis = build_basis(refs, "global")
    rows = torch.cat(basis.directions, dim=1)
    assert basis.rank() == 2
    assert torch.allclose(rows @ rows.T, torch.eye(2), atol=1e-6)


def test_state_dict_round_trip_and_bf16_storage():
    gen = torch.Generator().manual_seed(9)
    refs = [[t.to(torch.bfloat16) for t in rand_grads(gen)] for _ in range(2)]
    basis = build_basis(refs, "tensor", names=["a", "b"])
    assert all(d.dtype == torch.bfloat16 for d in basis.directions)
    again = SubspaceBasis.from_state_dict(basis.state_dict())
    g1 = [t.to(torch.bfloat16) for t in rand_grads(gen)]
    g2 = [t.clone() for t in g1]
    project_(g1, basis)
    project_(g2, again)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert again.names == ["a", "b"]
    # bf16 storage: the projection still removes >99% of the in-span component
    assert max(abs(c) for c in residual_cosines(g1, refs)) < 1e-2


def test_streaming_builder_equals_one_shot():
    gen = torch.Generator().manual_seed(10)
    refs = [rand_grads(gen) for _ in range(3)]
    b = BasisBuilder(refs[0], 3, "global")
    for j, r in enumerate(refs):
        b.add([t.clone() for t in r], f"s{j}")
    streamed = b.finish()
    one_shot = build_basis(refs, "global")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(streamed.directions, one_shot.directions))
    assert streamed.ref_norms.tolist() == pytest.approx([float(flat(r).norm()) for r in refs], rel=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_autograd_accumulates_into_the_builder_rows_and_scale_folds_in(granularity):
    # The rebuild path: `.grad` is a view of the builder's next row, micro-batches accumulate into
    # it in place, and `commit(scale=1/n)` turns the sum into the mean without a rescaling pass.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    data = [torch.randn(4, 6) for _ in range(3)]

    def loss_sum(x):
        return model(x).square().sum()

    means = [[g / 4 for g in torch.autograd.grad(loss_sum(x), params)] for x in data]
    expected = build_basis(means, granularity)
    builder = BasisBuilder(params, 3, granularity)
    for j, x in enumerate(data):
        rows = builder.next_row()
        for p, buf in zip(params, rows):
            p.grad = buf.view_as(p)
        loss_sum(x[:2]).backward()
        loss_sum(x[2:]).backward()
        assert all(p.grad.data_ptr() == buf.data_ptr() for p, buf in zip(params, rows))  # no copy
        for p in params:
            p.grad = None
        assert builder.commit(f"s{j}", scale=0.25) == pytest.approx(float(flat(means[j]).norm()), rel=1e-5)
    got = builder.finish()
    for a, b in zip(got.directions, expected.directions):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(got.coords, expected.coords):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_reference_gradient_is_refused_and_the_builder_stays_usable():
    gen = torch.Generator().manual_seed(12)
    r0, r1 = rand_grads(gen), rand_grads(gen)
    builder = BasisBuilder(r0, 2, "global")
    builder.add(r0, "a")
    bad = [t.clone() for t in r1]
    bad[2][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteGradient, match="'b'"):
        builder.add(bad, "b")
    builder.add(r1, "c")
    got, expected = builder.finish(), build_basis([r0, r1], "global")
    assert got.names == ["a", "c"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got.directions, expected.directions))


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_update_projection_makes_an_adam_like_step_orthogonal(granularity):
    # Adam rescales each coordinate of the (projected) gradient and weight decay adds -lr*wd*theta:
    # the step leaves the orthogonal complement. Projecting the change itself, from the K
    # coordinates noted before the step (no copy of the weights), brings it back.
    gen = torch.Generator().manual_seed(21)
    refs = [rand_grads(gen) for _ in range(3)]
    basis = build_basis(refs, granularity)
    theta = rand_grads(gen)
    old = [t.clone() for t in theta]
    g = rand_grads(gen)
    project_(g, basis)
    before = span_coordinates(theta, basis)
    for t, gi in zip(theta, g):  # "optimizer step": per-coordinate scales, then decoupled decay
        t.add_(-1e-2 * gi / (gi.abs().sqrt() + 1e-3)).mul_(1 - 1e-3)
    step = [t - o for t, o in zip(theta, old)]
    leak = max(abs(c) for c in residual_cosines(step, refs))
    assert leak > 0.01  # the rescaled, decayed step is not orthogonal
    observed, now = project_change_([t.clone() for t in theta], basis, before, "observe")
    removed, after = project_change_(theta, basis, before)
    assert removed == pytest.approx(observed) and removed > 0
    assert torch.allclose(now, span_coordinates(theta, basis) + (now - before), atol=1e-6)
    # a projected step keeps the coordinates: the returned ones serve as the next step's `before`
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.allclose(span_coordinates(theta, basis), before, atol=1e-5)
    step = [t - o for t, o in zip(theta, old)]
    assert max(abs(c) for c in residual_cosines(step, refs)) < leak / 100
    # what was removed lies in the span: the change keeps every out-of-span component
    assert float(flat(step).norm()) > 0.5 * float(flat([-1e-2 * gi / (gi.abs().sqrt() + 1e-3) for gi in g]).norm())


def test_update_projection_conflict_mode_only_touches_raising_blocks():
    gen = torch.Generator().manual_seed(22)
    refs = [rand_grads(gen) for _ in range(2)]
    basis = build_basis(refs, "tensor")
    theta = rand_grads(gen)
    before = span_coordinates(theta, basis)
    # a step along +r_0 on tensor 0 raises L_0 there (<d, r_0> > 0); along -r_0 on tensor 1 lowers it
    theta[0].add_(1e-2 * refs[0][0])
    theta[1].add_(-1e-2 * refs[0][1] - 1e-2 * refs[1][1])
    moved = [t.clone() for t in theta]
    project_change_(theta, basis, before, "conflict")
    assert not torch.allclose(theta[0], moved[0])  # raising block projected
    assert torch.equal(theta[1], moved[1])  # lowering block untouched


def test_bf16_coordinates_accumulate_in_float32():
    """U theta with bf16 rows and weights: the products are summed in float32, so the result is
    within float32 rounding of the float64 value of the same bf16 numbers (not bf16's 3 digits)."""
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(4096, generator=gen).bfloat16() for _ in range(3)]
    refs = [[torch.randn(4096, generator=gen)] * 3 for _ in range(3)]
    basis = build_basis([[t.bfloat16() for t in r] for r in refs])
    got = span_coordinates(weights, basis)
    exact = torch.cat([d.double() @ w.double() for d, w in zip(basis.directions, weights)])
    assert got.dtype == torch.float32
    assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    # the storage dtype alone (bf16 products summed in bf16) is off by about 1e-3 here
    stored = torch.cat([(d @ w).double() for d, w in zip(basis.directions, weights)])
    assert float((stored - exact).abs().max()) > 100 * float((got.double() - exact).abs().max())


def test_sharded_pieces_with_reduce_equal_whole_tensors():
    """Each of 2 'ranks' holds half of every tensor; `reduce` sums their partial inner products (here
    by running both halves and adding), and the pieces equal the whole-tensor projection."""
    gen = torch.Generator().manual_seed(3)
    refs = [rand_grads(gen) for _ in range(3)]
    g = rand_grads(gen)
    whole = build_basis(refs)
    expected = [t.clone() for t in g]
    project_(expected, whole)
    cut = [max(1, t.numel() // 2) for t in g]
    halves = [[t.reshape(-1)[:c] for t, c in zip(ts, cut)] for ts in (g, *refs)], \
        [[t.reshape(-1)[c:] for t, c in zip(ts, cut)] for ts in (g, *refs)]

    # run the two ranks in lock-step threads so that `reduce` can add their partial sums
    import threading

    barrier, box, out = threading.Barrier(2), [None, None], [None, None]

    def reduce_for(rank):
        def reduce(t):
            box[rank] = t.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            t.copy_(total)
            return t
        return reduce

    def rank_main(rank):
        mine = halves[rank]
        builder = BasisBuilder([t.clone() for t in mine[0]], 3, reduce=reduce_for(rank))
        for j, ref in enumerate(mine[1:]):
            builder.add(ref, f"r{j}")
        grads = [t.clone() for t in mine[0]]
        stats = project_(grads, builder.finish(), reduce=reduce_for(rank))
        out[rank] = (grads, stats)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (e, c) in enumerate(zip(expected, cut)):
        joined = torch.cat([out[0][0][i], out[1][0][i]])
        assert torch.allclose(joined, e.reshape(-1), atol=1e-6)
    whole_stats = project_([t.clone() for t in g], whole, "observe")
    assert out[0][1].grad_norm == pytest.approx(whole_stats.grad_norm, rel=1e-6)
    assert out[0][1].cosines == pytest.approx(out[1][1].cosines, abs=1e-7)
    assert out[0][1].cosines == pytest.approx(whole_stats.cosines, abs=1e-6)
