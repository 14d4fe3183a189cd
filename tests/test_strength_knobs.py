"""Strength knobs beyond the papers: the null space by energy (`ogpsa_null_energy`, as GPM) and more
than one gradient-span direction per reference set (`ogpsa_directions_per_set`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    MLP,
    REFS,
    SAMPLES,
    base_config,
    load_state,
    log_history,
    null_keys,
    ogpsa_keys,
    ogpsa_log,
    reference_inputs,
    run_cli,
    tokenized_references,
)


def spectrum_matrix(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, Q): a symmetric PSD C = Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    c = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return c.float(), q


# 16 in total; the top-k sums are 8, 12, 14, 15, 15.5, 15.75, 16, 16
SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.25, 0.0]


@pytest.mark.parametrize("energy,protected", [(0.5, 1), (0.75, 2), (0.76, 3), (0.9, 4), (0.95, 5), (0.99, 7),
                                              (1.0, 7), (0.0, 0)])
def test_energy_protects_the_fewest_directions_that_hold_the_fraction(energy, protected):
    """The protected dimension is the minimal k whose top-k eigenvalue sum reaches the fraction; the
    null space is spanned by the other eigenvectors and holds the rest of the energy."""
    from ogpsa.plugin.methods.null_space.maths import build_space, project_rows_

    c, q = spectrum_matrix(SPECTRUM)
    space = build_space(c, alpha=5e-5, energy=energy)
    top = torch.tensor(SPECTRUM, dtype=torch.float64).cumsum(0)
    assert space.dim - space.null_dim == protected
    if protected:  # minimal: one direction fewer does not reach the fraction
        assert top[protected - 1] >= energy * 16 * (1 - 1e-9) and (protected == 1 or top[protected - 2] < energy * 16)
    assert space.null_energy == pytest.approx(1 - float(top[protected - 1]) / 16 if protected else 1.0, abs=1e-6)
    # P annihilates exactly the protected eigenvectors and keeps the others
    m = q.T.float().clone()  # rows: the eigenvectors, largest eigenvalue first
    project_rows_(m, space)
    norms = m.norm(dim=1)
    assert torch.allclose(norms[:protected], torch.zeros(protected), atol=1e-5)
    assert torch.allclose(norms[protected:], torch.ones(len(SPECTRUM) - protected), atol=1e-5)


def test_energy_one_protects_the_whole_range_and_no_more():
    """Inputs of rank 5 in 16 dimensions: energy 1 protects those 5 directions (every reference input's
    layer output is kept exactly), not the 11 round-off eigenvalues no input reaches."""
    from ogpsa.plugin.methods.null_space.maths import build_space, project_rows_

    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    # orthogonal rows: eigenvalues 1600, 144, 16, 1.44, 0.04 and eleven zeros
    x = 4 * torch.tensor([10.0, 3.0, 1.0, 0.3, 0.05], dtype=torch.float64).unsqueeze(1) * q[:5]
    space = build_space(x.T @ x, alpha=5e-5, energy=1.0)
    assert (space.dim - space.null_dim, space.null_dim) == (5, 11)
    w = torch.randn(7, 16, generator=g, dtype=torch.float64)
    project_rows_(w, space)
    assert float((w @ x.T).norm()) <= 1e-5 * float(w.norm()) * float(x.norm())
    # alpha keeps NSPO's ratio test: the 0.04 eigenvalue (2.5e-5 of the largest) is left free
    assert build_space(x.T @ x, alpha=5e-5).null_dim == 12


BAD = {
    "both": ({"ogpsa_null_alpha": 0.1, "ogpsa_null_energy": 0.9},
             "ogpsa_null_alpha, ogpsa_null_energy: give one or the other"),
    "energy_range": ({"ogpsa_null_alpha": None, "ogpsa_null_energy": 1.5},
                     "ogpsa_null_energy: must be in [0, 1], got 1.5"),
    "energy_type": ({"ogpsa_null_alpha": None, "ogpsa_null_energy": "most"}, "ogpsa_null_energy: expected a number"),
    "energy_span": ({"ogpsa_method": "gradient_span", "ogpsa_null_alpha": None, "ogpsa_null_energy": 0.9},
                    "ogpsa_null_energy: not used by ogpsa_method=gradient_span"),
    "r_null": ({"ogpsa_directions_per_set": 2}, "ogpsa_directions_per_set: not used by ogpsa_method=null_space"),
    "r_zero": ({"ogpsa_method": "gradient_span", "ogpsa_null_alpha": None, "ogpsa_directions_per_set": 0},
               "ogpsa_directions_per_set: must be >= 1, got 0"),
    "r_samples": ({"ogpsa_method": "gradient_span", "ogpsa_null_alpha": None, "ogpsa_directions_per_set": 5},
                  "ogpsa_directions_per_set: 5 groups need at least as many samples per set, but "
                  "ogpsa_reference_samples is 4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_knob_settings_are_named(case):
    """What `llamafactory-cli train` checks before launch, in this process (the contract of exit 2, one
    line and nothing written: test_ogpsa_sft.test_bad_settings_fail_before_training)."""
    from ogpsa.plugin.settings import OGPSAConfigError, split_ogpsa_args

    keys, message = BAD[case]
    args = {k: v for k, v in {**null_keys(), **keys}.items() if v is not None}
    with pytest.raises(OGPSAConfigError) as err:
        split_ogpsa_args(args, "x.yaml: ")
    assert str(err.value).startswith("x.yaml: " + message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.long  # one training run: 43 s on 2 shared cores
def test_energy_null_space_keeps_the_layer_output_bound(tiny, tmp_path):
    """energy 0.9 on the tiny model: each MLP linear protects the fewest input directions holding 90% of
    its reference inputs' energy (recomputed here from the start model), and its outputs on those
    inputs move at most ||dW||_2 x sqrt(the energy left free), while the safety loss falls."""
    energy = 0.9
    x = reference_inputs(tiny, MLP)
    start = load_state(Path(tiny["model"]))
    out = tmp_path / "energy"
    keys = {k: v for k, v in null_keys(ogpsa_null_energy=energy).items() if k != "ogpsa_null_alpha"}
    run_cli(base_config(tiny, out, optim="adamw_torch", learning_rate=1e-3, max_steps=4, max_grad_norm=0.0, **keys),
            tmp_path / "run")
    trained = load_state(out)
    losses = [r["loss"] for r in log_history(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1, losses
    event = ogpsa_log(out)[0]
    for name in MLP:
        eig = torch.linalg.eigvalsh(x[name].T @ x[name]).clamp_min(0).flip(0)  # descending
        top = eig.cumsum(0)
        k = int((top >= energy * top[-1]).nonzero()[0]) + 1
        free = float(top[-1] - top[k - 1])
        # the plugin's covariance sums the same rows in float32 and another order: the same k
        assert event[f"protected_dim/{name}"] == k, (name, event[f"protected_dim/{name}"], k)
        assert event[f"protected_energy/{name}"] >= energy - 1e-6
        assert event[f"null_dim/{name}"] == x[name].shape[1] - k
        w0 = start[f"{name}.weight"].double()
        dw = trained[f"{name}.weight"].double() - w0
        moved = float((dw @ x[name].T).norm())
        bound = float(torch.linalg.matrix_norm(dw, ord=2)) * free**0.5
        assert float(dw.norm()) > 1e-4, f"{name} did not train"
        assert moved <= bound * (1 + 1e-4) + 1e-6 * float((w0 @ x[name].T).norm()), (name, moved, bound)


# ---- gradient span: r directions per reference set -----------------------------------------------------


def split_basis(tiny, r: int):
    """(GradientSpan after one build at the start model, the model, the groups) in this process."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.constraint import BuildContext, SetupContext
    from ogpsa.plugin.methods.gradient_span.method import GradientSpan
    from ogpsa.plugin.settings import split_ogpsa_args
    from ogpsa.plugin.sharding import Replicated

    sets, make_collator = tokenized_references(tiny["model"], tiny, REFS, SAMPLES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    keys = ogpsa_keys(ogpsa_reference_samples=SAMPLES, **({"ogpsa_directions_per_set": r} if r != 1 else {}))
    settings, _ = split_ogpsa_args(keys)
    span = GradientSpan(settings)
    span.setup(SetupContext(model=model, params=params, layout=Replicated(params), is_main=True))
    bar = tqdm(disable=True)
    passed = []  # the sets each reference pass is over: its progress bar counts their micro-batches

    def reference_pass(label, refs=None):
        passed.append(refs)
        return 2, bar

    span.build(BuildContext(model=model, refs=sets, collator=make_collator(model), step=0, world_size=1, is_main=True,
                            followup=False, reference_pass=reference_pass))
    assert passed == [span.groups(sets)]
    return span, model, params, span.groups(sets), make_collator(model)


def group_gradient(model, params, group, collator) -> list[torch.Tensor]:
    """The mean answer-token NLL gradient of one group's samples, one sample at a time (no padding)."""
    for p in params:
        p.grad = None
    tokens = 0
    for f in group.features:
        batch = collator([dict(f)])
        n = int((batch["labels"][:, 1:] != -100).sum())
        (model(**batch).loss * n).backward()
        tokens += n
    grads = [p.grad.detach().clone() / tokens for p in params]
    for p in params:
        p.grad = None
    return grads


def test_directions_per_set_span_every_group_gradient(tiny):
    """r = 2: each set's samples are split in two disjoint groups; the basis holds 2 x 3 directions per
    tensor, a projected gradient is orthogonal to every group's gradient (recomputed here), and r = 1
    is the unsplit basis, one direction per set."""
    from ogpsa.plugin.methods.gradient_span.maths import project_

    span, model, params, groups, collator = split_basis(tiny, 2)
    assert [g.name for g in groups] == [f"{n}#{i}" for n in REFS for i in (0, 1)]
    assert span.basis.names == [g.name for g in groups]
    assert span.basis.rank() == 6
    one, *_ = split_basis(tiny, 1)
    assert one.basis.names == REFS and one.basis.rank() == 3
    # r = 1 is today's basis: the same rows as the sets' own gradients orthonormalised
    assert one.groups(one._groups[0]) is one._groups[0]
    sets = one._groups[0]
    for ref in sets:  # the groups are disjoint and together the whole set
        ids = sorted(tuple(f["input_ids"]) for g in groups if g.name.startswith(ref.name + "#") for f in g.features)
        assert ids == sorted(tuple(f["input_ids"]) for f in ref.features)
    g = torch.Generator().manual_seed(3)
    step = [torch.randn(p.shape, generator=g) for p in params]
    project_(step, span.basis, "project")
    checked = 0
    for group in groups:
        ref = group_gradient(model, params, group, collator)
        for s, r in zip(step, ref):
            if float(r.norm()) > 1e-3 * max(float(r.abs().max()), 1e-30) and float(r.norm()) > 0:
                cos = float((s * r).sum()) / (float(s.norm()) * float(r.norm()))
                assert abs(cos) < 1e-4, (group.name, cos)
                checked += 1
    assert checked > 6 * len(params) // 2
    # the r = 1 rows span the sets' gradients: a projected step is orthogonal to them too
    step1 = [torch.randn(p.shape, generator=g) for p in params]
    project_(step1, one.basis, "project")
    for ref in sets:
        grads = group_gradient(model, params, ref, collator)
        worst = max(abs(float((s * r).sum())) / (float(s.norm()) * float(r.norm()) + 1e-30)
                    for s, r in zip(step1, grads))
        assert worst < 1e-4, ref.name


@pytest.mark.long  # one training run: 43 s on 2 shared cores
def test_directions_per_set_memory_matches_the_rebuild_log(tiny, tmp_path):
    """r = 2 through `llamafactory-cli`: the rebuild log's basis_bytes is r x sets x trainable parameters
    x 4 bytes (float32 rows, one process), twice r = 1's; the logged projected-gradient cosines with
    every group's gradient are ~0."""
    out = tmp_path / "r2"
    keys = ogpsa_keys(ogpsa_reference_samples=SAMPLES, ogpsa_directions_per_set=2, ogpsa_refresh_steps=0)
    run_cli(base_config(tiny, out, max_steps=2, **keys), tmp_path / "run")
    log = ogpsa_log(out)
    event = log[0]
    assert event["event"] == "rebuild" and event["rank"] == 6
    assert event["basis_bytes"] == 2 * 3 * event["param_numel"] * 4
    after = [r for r in log if any(k.startswith("cos_after/") for k in r)]
    assert after
    for r in after:
        cos = {k: v for k, v in r.items() if k.startswith("cos_after/")}
        assert sorted(cos) == sorted(f"cos_after/{n}#{i}" for n in REFS for i in (0, 1))
        assert max(abs(v) for v in cos.values()) < 1e-4, cos
