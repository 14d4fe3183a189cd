"""A gradient span that stays current between rebuilds (`ogpsa_keep_previous`): the maths of carrying
the previous build's directions, and the schedule's protection on the tiny model."""

from pathlib import Path

import pytest
import torch
from helpers import REFS, base_config, ogpsa_log, reference_losses, run_cli

from ogpsa.plugin.methods.gradient_span.maths import BasisBuilder, SubspaceBasis, build_basis, project_

SHAPES = [(7, 5), (11,), (3, 4, 2), (1,)]


def rand_grads(gen, scale=1.0):
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def carried_build(old: SubspaceBasis, new_refs, granularity):
    carry = old.fresh_rows()
    builder = BasisBuilder(new_refs[0], len(new_refs), granularity, carry=carry)
    assert all(c is None for c in carry), "the builder lets go of every carried row once copied"
    for j, g in enumerate(new_refs):
        builder.add(g, f"n{j}")
    return builder.finish()


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_carried_basis_spans_both_builds_and_its_first_rows_the_new_one(granularity):
    gen = torch.Generator().manual_seed(0)
    old_refs = [rand_grads(gen) for _ in range(3)]
    new_refs = [rand_grads(gen) for _ in range(3)]
    old = build_basis(old_refs, granularity)
    basis = carried_build(old, new_refs, granularity)
    both = build_basis(old_refs + new_refs, granularity)
    assert basis.rank() == both.rank()
    # orthonormal rows, and every old and new reference gradient is inside the span
    for refs in (old_refs, new_refs):
        for r in refs:
            g = [t.clone() for t in r]
            stats = project_(g, basis)
            assert stats.removed_fraction == pytest.approx(1.0, abs=1e-5)
    for d in basis.directions:
        if d.shape[0] and granularity == "tensor":
            assert torch.allclose(d @ d.t(), torch.eye(d.shape[0]), atol=1e-5)
    # the leading rows (`fresh`) span exactly the new build's gradients: what the next build carries
    fresh = SubspaceBasis(granularity, basis.fresh_rows(), [c[:, :k] for c, k in zip(basis.coords, basis.fresh)],
                          basis.ref_norms)
    for r in new_refs:
        assert project_([t.clone() for t in r], fresh).removed_fraction == pytest.approx(1.0, abs=1e-5)
    for r in old_refs:  # random old gradients are not in the new span
        assert project_([t.clone() for t in r], fresh).removed_fraction < 0.99
    # coordinates and norms are the new sets' only (the carried rows are not reference sets)
    assert basis.names == ["n0", "n1", "n2"]
    assert basis.coords[0].shape[0] == 3 and basis.ref_norms.numel() == 3
    for block, coords in zip(basis.blocks(), basis.coords):
        for j, r in enumerate(new_refs):
            rebuilt = torch.cat([(coords[j] @ basis.directions[i]) for i in block])
            assert torch.allclose(rebuilt, torch.cat([r[i].reshape(-1) for i in block]), atol=1e-5)


def test_only_the_previous_build_is_carried_not_every_earlier_one():
    gen = torch.Generator().manual_seed(1)
    bases = [build_basis([rand_grads(gen)], "global")]
    for _ in range(3):
        bases.append(carried_build(bases[-1], [rand_grads(gen)], "global"))
    assert [b.rank() for b in bases] == [1, 2, 2, 2]
    assert bases[-1].fresh == [1]


def test_a_carried_direction_inside_the_new_span_adds_nothing():
    gen = torch.Generator().manual_seed(2)
    refs = [rand_grads(gen) for _ in range(2)]
    old = build_basis(refs, "tensor")
    basis = carried_build(old, [[t * 3 for t in r] for r in refs], "tensor")
    assert basis.rank() == 2 and basis.fresh == [min(2, torch.Size(s).numel()) for s in SHAPES]
    assert [d.shape[0] for d in basis.directions] == basis.fresh


def test_fresh_survives_the_state_dict():
    gen = torch.Generator().manual_seed(3)
    basis = carried_build(build_basis([rand_grads(gen)]), [rand_grads(gen)], "tensor")
    again = SubspaceBasis.from_state_dict(basis.state_dict())
    assert again.fresh == basis.fresh == [1] * len(SHAPES)
    assert [d.shape for d in again.fresh_rows()] == [(1, torch.Size(s).numel()) for s in SHAPES]


# ---- the default schedule on the tiny model (stock llamafactory-cli, AdamW) ---------------------------------
SAFETY = "toy_safety_sft"
LORA = {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "learning_rate": 2e-3}
FULL = {"learning_rate": 1e-4}
STEPS = 24


def _train(tiny, out, keys: dict, extra: dict, save_at: int | None = None):
    cfg = base_config(tiny, out / "model", max_steps=STEPS, optim="adamw_torch", **extra, **keys)
    if save_at:
        cfg.update(save_strategy="steps", save_steps=save_at, save_only_model=True)
    run_cli(cfg, out)
    return out / "model"


def _moves(tiny, model: Path, lora: bool, start: dict) -> tuple[float, float]:
    """(largest reference-loss move, safety-loss change) of a trained model or adapter."""
    after = reference_losses(tiny["model"], tiny, REFS + [SAFETY], adapter=str(model)) if lora else \
        reference_losses(str(model), tiny, REFS + [SAFETY])
    return max(abs(after[n] - start[n]) for n in REFS), after[SAFETY] - start[SAFETY]


DEFAULTS = {"stage": "ogpsa_sft", "ogpsa_reference": ",".join(REFS), "ogpsa_reference_samples": 16}


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_the_defaults_keep_the_reference_losses_ten_times_steadier_at_bounded_cost(tiny, tmp_path, start_losses,
                                                                                   setting):
    """With nothing but the stage changed: 10x steadier reference losses than plain over 24 steps (and
    after 6 for LoRA), at least half of plain's safety-loss drop, at most 6 full rebuilds' reference tokens."""
    lora = setting == "lora"
    extra = LORA if lora else FULL
    start = start_losses
    plain = _train(tiny, tmp_path / "plain", {}, extra, save_at=6 if lora else None)
    ours = _train(tiny, tmp_path / "ogpsa", DEFAULTS, extra, save_at=6 if lora else None)
    checks = [(STEPS, plain, ours)]
    if lora:
        checks.append((6, plain / "checkpoint-6", ours / "checkpoint-6"))
    for steps, p_dir, o_dir in checks:
        p_move, p_safety = _moves(tiny, p_dir, lora, start)
        o_move, o_safety = _moves(tiny, o_dir, lora, start)
        print(f"{setting} after {steps} steps: steadiness {p_move / o_move:.1f}x, safety {o_safety:+.4f} "
              f"(plain {p_safety:+.4f})")
        assert p_move > 0.02, "plain training must visibly move the reference losses"
        assert o_move * 10 <= p_move
        assert o_safety <= 0.5 * p_safety < 0
    rebuilds = [r for r in ogpsa_log(ours) if r.get("event") == "rebuild"]
    tokens = [sum(v for k, v in r.items() if k.startswith("input_tokens/")) for r in rebuilds]
    assert sum(tokens) <= 6 * tokens[0]
    assert rebuilds[0]["reason"] == "start" and all(r["reason"] in ("scheduled", "followup") for r in rebuilds[1:])
    assert [r["step"] for r in rebuilds if r["reason"] == "scheduled"] == [5, 10, 15, 20]
    assert all(r["kept_directions"] > 0 for r in rebuilds[1:] if r["reason"] == "scheduled")
