"""`ogpsa_method: gradient_span+null_space`: the span of the reference gradients projected into the null
space, inside the null space.

The invariant: the update d lies in each constrained layer's null space (d = d P) and is orthogonal to
the projected reference gradients (U d = 0), so for every RAW reference gradient r,
<r, d> = <r, P d> = <P r, d> = 0, and the constrained layers' outputs on the reference inputs stay within
the null space's bound. Checked on the maths alone, on the constraint driven in this process, and on the
weights a stock `llamafactory-cli train` run wrote, against reference gradients and inputs recomputed here.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    ALPHA,
    MLP,
    REFS,
    SAMPLES,
    base_config,
    cosine,
    load_state,
    max_diff,
    mean_nll_gradient,
    null_energy,
    null_keys,
    ogpsa_log,
    one_and_two_processes,
    reference_inputs,
    run_cli,
    tokenized_references,
)

COMPOSED = "gradient_span+null_space"


def both_keys(**overrides) -> dict:
    """The null-space tests' set-up (4 samples per set, alpha 0.05) under the composition, rebuilt every step."""
    return null_keys(**{"ogpsa_method": COMPOSED, "ogpsa_refresh_steps": 1, **overrides})


# ---- the maths -----------------------------------------------------------------------------------------


def test_the_composed_update_is_orthogonal_to_every_raw_reference_gradient_and_stays_in_the_null_space():
    """One constrained matrix W (rows x d, inputs X of rank 3 < d) and one free tensor e. The reference
    gradients are projected, r_W <- r_W P, before the span is built; a gradient projected by P then by the
    span, and an Adam-like step projected after it, are orthogonal to every raw reference gradient and in
    the null space. Either half alone, or a span of the raw gradients, is not."""
    from ogpsa.plugin.methods.gradient_span.maths import BasisBuilder, project_, project_change_, span_coordinates
    from ogpsa.plugin.methods.null_space.maths import anchor, build_space, project_rows_, restore_

    gen = torch.Generator().manual_seed(0)
    rows, d = 5, 8
    x = torch.randn(40, 3, generator=gen) @ torch.randn(3, d, generator=gen)  # reference inputs: rank 3
    space = build_space(x.T @ x, 1e-6)
    assert space.null_dim == d - 3
    raw = [[torch.randn(rows, d, generator=gen), torch.randn(7, generator=gen)] for _ in range(3)]

    def span(project_refs: bool):
        builder = BasisBuilder([torch.zeros(rows, d), torch.zeros(7)], 3)
        for r in raw:
            r = [t.clone() for t in r]
            if project_refs:
                project_rows_(r[0], space)
            builder.add(r)
        return builder.finish()

    inside, outside = span(True), span(False)
    g0 = [torch.randn(rows, d, generator=gen), torch.randn(7, generator=gen)]

    def composed(basis, null: bool, null_last: bool = False):
        g = [t.clone() for t in g0]
        if null and not null_last:
            project_rows_(g[0], space)
        project_(g, basis)
        if null and null_last:
            project_rows_(g[0], space)
        return g

    def worst(g):  # the largest |cosine| with a raw reference gradient, and the layer's output change
        return max(abs(cosine(g, r)) for r in raw), float((g[0] @ x.T).norm() / (g[0].norm() * x.norm()))

    cos, moved = worst(composed(inside, True))
    assert cos < 1e-6 and moved < 1e-6, (cos, moved)
    # a span of the raw gradients: P after it undoes the orthogonality, P before it is left by it
    assert worst(composed(outside, True, null_last=True))[0] > 1e-2
    assert worst(composed(outside, True))[1] > 1e-2
    assert worst(composed(outside, False))[1] > 1e-2  # the span alone: leaves the null space
    g_null = [t.clone() for t in g0]
    project_rows_(g_null[0], space)
    assert worst(g_null)[0] > 1e-2  # the null space alone: the free tensor e moves the reference losses

    # ogpsa_target=update: an Adam-like step (each coordinate rescaled) taken back into both constraints
    w = [torch.randn(rows, d, generator=gen), torch.randn(7, generator=gen)]
    start = [t.clone() for t in w]
    g = composed(inside, True)
    kept, coords = anchor(w[0], space), span_coordinates(w, inside)
    for t, gt in zip(w, g):
        t.sub_(1e-2 * gt / (gt.abs().sqrt() + 1e-3))
    restore_(w[0], space, kept)
    project_change_(w, inside, coords)
    step = [a - b for a, b in zip(w, start)]
    cos, moved = worst(step)
    assert cos < 1e-5 and moved < 1e-5 and float(step[0].norm()) > 1e-3, (cos, moved)


# ---- the constraint, driven in this process ------------------------------------------------------------


def build(tiny, **overrides):
    """(SpanInNullSpace built at the start model, the model, its trainable parameters, the sets, a collator)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.constraint import BuildContext, SetupContext, make
    from ogpsa.plugin.settings import split_ogpsa_args
    from ogpsa.plugin.sharding import Replicated

    sets, make_collator = tokenized_references(tiny["model"], tiny, REFS, SAMPLES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    settings, _ = split_ogpsa_args(both_keys(**overrides))
    both = make(settings)
    both.setup(SetupContext(model=model, params=params, layout=Replicated(params), is_main=True))
    collator = make_collator(model)
    event = both.build(BuildContext(model=model, refs=sets, collator=collator, step=0, world_size=1, is_main=True,
                                    followup=False, reference_pass=lambda label, refs=None: (2, tqdm(disable=True))))
    return both, event, model, params, sets, collator


def test_the_constraint_projects_every_step_into_both(tiny):
    """At the start model: a random gradient after `project_grad`, and the step an optimizer took from it
    after `project_step`, are orthogonal to each set's raw gradient (recomputed here, one sample at a
    time) and leave every MLP linear's outputs on the reference inputs (recomputed here) in place."""
    both, event, model, params, sets, collator = build(tiny)
    names = dict(model.named_parameters())
    assert event["method"] == COMPOSED and event["null_space_built"] and event["rank"] == 3
    assert event["spaces"] == 4 and all(0 < event[f"ref_kept/{n}"] < 1 for n in REFS)
    assert "null_basis_bytes" in event and "basis_bytes" in event
    raw = {ref.name: mean_nll_gradient(model, params, ref.features, collator) for ref in sets}
    x = reference_inputs(tiny, MLP)
    index = {n: i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    start = [p.detach().clone() for p in params]
    both.project_grad(0, measure=True)
    record = both.grad_record()
    assert all(abs(record[f"cos_after/{n}"]) < 1e-5 for n in REFS), record
    assert 0 < record["null_removed_fraction"] < 1 and 0 < record["removed_fraction"] < 1

    def check(vectors, what: str) -> None:
        vectors = [torch.zeros_like(p) if v is None else v for v, p in zip(vectors, params)]
        for name, r in raw.items():
            assert abs(cosine(vectors, r)) < 1e-5, (what, name, cosine(vectors, r))
        for layer in MLP:
            dw = vectors[index[f"{layer}.weight"]].double()
            moved = float((dw @ x[layer].T).norm())
            bound = float(torch.linalg.matrix_norm(dw, ord=2)) * null_energy(x[layer], ALPHA) ** 0.5
            assert moved <= bound * (1 + 1e-4) + 1e-7 * float(dw.norm() * x[layer].norm()), (what, layer)

    check([p.grad for p in params], "gradient")
    with torch.no_grad():  # an Adam-like step: each coordinate rescaled, every trainable tensor moved
        for p in params:
            p.sub_(1e-3 * torch.randn(p.shape, generator=gen) if p.grad is None else 1e-3 * p.grad.sign())
    removed = both.project_step(0)
    assert removed > 0
    step = [p.detach() - s for p, s in zip(params, start)]
    check(step, "update")
    assert float(step[index["model.layers.0.mlp.gate_proj.weight"]].norm()) > 1e-4
    # the constrained layers' biases are held (the tiny Qwen2 has none in its MLPs; attention's are free)
    assert all(names[n].grad is not None for n in names if n.endswith("q_proj.bias"))


def test_only_the_span_is_rebuilt_and_the_state_round_trips(tiny):
    """A second build rebuilds the span, not the null spaces; state_dict/load_state_dict restore both."""
    from tqdm import tqdm

    from ogpsa.plugin.constraint import BuildContext

    both, event, model, params, sets, collator = build(tiny)
    spaces = [s.vectors.clone() for s in both.null.spaces]
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    again = both.build(BuildContext(model=model, refs=sets, collator=collator, step=1, world_size=1, is_main=True,
                                    followup=False, reference_pass=lambda label, refs=None: (2, tqdm(disable=True))))
    assert not again["null_space_built"] and "null_dims" not in again and again["rank"] == 6  # 3 kept
    assert all(torch.equal(a, b.vectors) for a, b in zip(spaces, both.null.spaces))
    state = both.state_dict()
    assert {"basis", "spaces", "anchors", "turn"} <= set(state)
    fresh, *_ = build(tiny)
    fresh.load_state_dict(state)
    assert fresh.ready() and fresh.span.basis.rank() == both.span.basis.rank()
    assert fresh.identity() == both.identity() and fresh.identity()["null_alpha"] == ALPHA


def test_rotation_inside_the_null_space(tiny):
    """ogpsa_reference_rotation: 2 under the composition: the kept share's gradient, re-formed from the
    basis, is still the projected one, so after a rotated rebuild a projected gradient is orthogonal to
    each share's RAW gradient at the weights it was read at, and stays in the null spaces."""
    from tqdm import tqdm

    from ogpsa.plugin.constraint import BuildContext

    both, event, model, params, sets, collator = build(tiny, ogpsa_reference_rotation=2)
    shares = both.span.shares(sets)
    raw = {src.name: mean_nll_gradient(model, params, src.features, collator) for share in shares for src in share}
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn_like(p) * p.detach().abs().mean())
    again = both.build(BuildContext(model=model, refs=sets, collator=collator, step=1, world_size=1, is_main=True,
                                    followup=False, reference_pass=lambda label, refs=None: (2, tqdm(disable=True))))
    assert (event["shares_read"], again["shares_read"], again["rank"]) == ([0, 1], [0], 6)
    assert sorted(k for k in again if k.startswith("ref_kept/")) == sorted(f"ref_kept/{n}@0" for n in REFS)
    raw.update({src.name: mean_nll_gradient(model, params, src.features, collator) for src in shares[0]})
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    both.project_grad(0, measure=False)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for name, r in raw.items():
        assert abs(cosine(grads, r)) < 1e-5, (name, cosine(grads, r))
    from ogpsa.plugin.methods.null_space.maths import project_rows_

    named = dict(zip((n for n, p in model.named_parameters() if p.requires_grad), grads))
    for layer in both.null.layers:  # G P = G: projecting again removes nothing
        g = named[f"{layer.name}.weight"]
        assert project_rows_(g.clone(), both.null.spaces[layer.space]) <= 1e-5 * float(g.norm()), layer.name


# ---- through `llamafactory-cli train` ------------------------------------------------------------------

ADAMW_2 = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 2, "max_grad_norm": 1.0,
           "save_strategy": "steps", "save_steps": 1}


def test_trained_updates_keep_every_raw_reference_gradient_and_layer_output(tiny, tmp_path):
    """AdamW, the update target, a rebuild every step, 2 steps: each step's weight change (from the saved
    checkpoints) is orthogonal to every set's raw gradient at the weights it was taken from, and the MLP
    linears' outputs on the reference inputs move within the null space's bound, while the loss falls."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "both"
    run_cli(base_config(tiny, out, **ADAMW_2, **both_keys()), tmp_path / "run")
    points = [Path(tiny["model"]), out / "checkpoint-1", out / "checkpoint-2"]
    states = [load_state(p) for p in points]
    sets, make_collator = tokenized_references(tiny["model"], tiny, REFS, SAMPLES)
    for k in range(2):  # step k + 1 was taken from point k, with the span built there
        model = AutoModelForCausalLM.from_pretrained(str(points[k]), dtype=torch.float32)
        named = [(n, p) for n, p in model.named_parameters()]
        params = [p for _, p in named]
        step = [states[k + 1][n].double() - states[k][n].double() for n, _ in named]
        for ref in sets:
            r = mean_nll_gradient(model, params, ref.features, make_collator(model))
            cos = cosine(step, r)
            print(f"step {k + 1}: cosine of the update with the raw gradient of {ref.name}: {cos:.2e}")
            assert abs(cos) < 1e-5, (k, ref.name, cos)
    x = reference_inputs(tiny, MLP)
    for name in MLP:
        w0 = states[0][f"{name}.weight"].double()
        dw = states[2][f"{name}.weight"].double() - w0
        moved = float((dw @ x[name].T).norm())
        bound = float(torch.linalg.matrix_norm(dw, ord=2)) * null_energy(x[name], ALPHA) ** 0.5
        assert float(dw.norm()) > 1e-4 and moved <= bound * (1 + 1e-4) + 1e-6 * float((w0 @ x[name].T).norm())
    log = ogpsa_log(out)
    rebuilds = [r for r in log if r.get("event") == "rebuild"]
    assert [(r["step"], r["null_space_built"]) for r in rebuilds] == [(0, True), (1, False)]
    steps = [r for r in log if "update_removed_norm" in r]
    assert len(steps) == 2 and all(r["update_removed_norm"] > 0 for r in steps)
    assert all(abs(r[f"cos_after/{n}"]) < 1e-4 for r in steps for n in REFS)


@pytest.mark.long  # one LoRA run
def test_lora_rebuilds_the_span_not_the_null_spaces(tiny, tmp_path):
    """LoRA on every linear, every one constrained, a rebuild every step: A <- A P once at step 0, the
    span's follow-up at step 1 (A had no reference gradient while B = 0) and its rebuilds after it, no
    null-space rebuild (which would move a trained adapter); every A stays in its null space and the
    logged cosines with the projected reference gradients are ~0."""
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    keys = {"finetuning_type": "lora", "lora_target": "all", "optim": "adamw_torch", "learning_rate": 1e-2,
            "max_steps": 3, **both_keys(ogpsa_null_layers="all_linear")}
    run_cli(base_config(tiny, out, **keys), tmp_path / "run")
    log = ogpsa_log(out)
    rebuilds = [(r["step"], r["reason"], r["null_space_built"]) for r in log if r.get("event") == "rebuild"]
    assert rebuilds == [(0, "start", True), (1, "followup", False), (2, "scheduled", False)]
    assert log[0]["lora_a_moved"] > 0 and log[0]["zero_rank_blocks"] > 0
    steps = [r for r in log if "update_removed_norm" in r]
    assert len(steps) == 3 and all(abs(r[f"cos_after/{n}"]) < 1e-4 for r in steps for n in REFS)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    names = [k.split("null_dim/")[1] for k in log[0] if k.startswith("null_dim/")]
    x = reference_inputs(tiny, [n.replace("base_model.model.", "") for n in names if "layers.1." in n])
    for name, rows in x.items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        bound = float(torch.linalg.matrix_norm(a, ord=2)) * null_energy(rows, ALPHA) ** 0.5
        assert float((a @ rows.T).norm()) <= bound * (1 + 1e-4) + 1e-6 * float(rows.norm()), name


BAD = {
    "deepspeed": ({"deepspeed": "ds.json"}, f"deepspeed: ogpsa_method={COMPOSED} runs on one process or DDP"),
    "fsdp": ({"fsdp": "full_shard", "fsdp_config": {"version": 2}},
             f"fsdp: ogpsa_method={COMPOSED} runs on one process or DDP"),
    "dora": ({"finetuning_type": "lora", "use_dora": True}, f"use_dora: ogpsa_method={COMPOSED} does not support"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_engines_both_methods_cannot_serve_are_refused_before_launch(tiny, case):
    from ogpsa.plugin import preflight
    from ogpsa.plugin.settings import OGPSAConfigError

    keys, message = BAD[case]
    args = {**base_config(tiny, Path("unused")), **both_keys(), **keys}
    with pytest.raises(OGPSAConfigError, match=re.escape(message)) as err:
        preflight.preflight(args, "x.yaml: ")
    assert "\n" not in str(err.value)


def test_lora_may_rebuild_the_span_and_both_methods_keys_are_taken():
    from ogpsa.plugin.engines import check_arguments
    from ogpsa.plugin.settings import split_ogpsa_args

    keys = both_keys(ogpsa_null_energy=0.5, ogpsa_directions_per_set=2)
    del keys["ogpsa_null_alpha"]
    settings, _ = split_ogpsa_args(keys)
    assert settings.refresh_steps == 1 and settings.ogpsa_null_energy == 0.5
    check_arguments({"finetuning_type": "lora"}.get, settings)  # the null space alone refuses this


# ---- resume and DDP ------------------------------------------------------------------------------------

SIX = {"optim": "adamw_torch", "learning_rate": 2e-3, "max_steps": 6, "save_strategy": "steps", "save_steps": 3,
       "overwrite_output_dir": False}


@pytest.mark.long  # two one-process runs
def test_resume_equals_the_uninterrupted_run(tiny, tmp_path):
    """The span, its update coordinates, the null spaces and their anchors travel with the checkpoint: the
    resumed run builds the span where the uninterrupted one did and ends at its weights; the null spaces
    are not rebuilt at the resume step."""
    cfg = base_config(tiny, None, **SIX, **both_keys(ogpsa_refresh_steps=2))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_cli({**cfg, "output_dir": str(whole)}, tmp_path / "run_whole")
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    for name in ("model.safetensors", "trainer_state.json"):
        (resumed / name).unlink()
    proc = run_cli({**cfg, "output_dir": str(resumed), "resume_from_checkpoint": str(resumed / "checkpoint-3")},
                   tmp_path / "run_resume")
    assert "resumed the subspace built at step 2" in proc.stderr + proc.stdout
    gap = max_diff(load_state(whole), load_state(resumed))
    print(f"resumed vs uninterrupted: {gap:.2e}")
    assert gap < 1e-6
    rebuilds = [(r["step"], r["null_space_built"]) for r in ogpsa_log(resumed) if r.get("event") == "rebuild"]
    assert rebuilds == [(0, True), (2, False), (4, False)]


@pytest.mark.multiprocess
def test_two_processes_match_one(tiny, tmp_path):
    """DDP (gloo): the reference batches split over the ranks, covariances and gradients summed: the same
    null spaces, span and weights as one process with the same global batch (8 samples, all every step)."""
    rebuilds, _ = one_and_two_processes(tiny, tmp_path, 2, both_keys())
    one, two = rebuilds[1], rebuilds[2]
    assert [r["world_size"] for r in two] == [2, 2] and all(r["rank_spread"] == 0.0 for r in two)
    for a, b in zip(one, two):  # the same tokens read, the same null dimensions and span rank
        same = [k for k in a if k.startswith(("null_dim/", "tokens/", "null_input_tokens/")) or k == "rank"]
        assert same and {k: a[k] for k in same} == {k: b[k] for k in same}
