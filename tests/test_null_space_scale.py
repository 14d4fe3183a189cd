"""The null-space method where large runs go: MoE blocks, 7B-sized covariances, alpha = 0, and the
set-ups it refuses (FSDP2 CPU offload, DoRA), and LoRA rebuilds with a trained B.

MoE: a tiny Qwen2-MoE built here (transformers' config, the tiny tokenizer). Its block flattens
the hidden states to (b*s, d) before the shared expert, so the covariance hooks see 2-D inputs.
Memory: the rebuild's allocations are recorded with torch's profiler (every CPU allocation and
free, LAPACK's workspace included) and checked against `activations.peak_bytes`.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import REFS, base_config, ogpsa_keys, run_cli, tokenized_references
from ogpsa.plugin.methods.null_space.activations import (
    constrained_layers,
    input_spaces,
    peak_bytes,
    unconstrained_weights,
)
from ogpsa.plugin.methods.null_space.maths import build_space, project_rows_
from ogpsa.plugin.settings import OGPSAArguments, OGPSAConfigError


def null_settings(**keys) -> OGPSAArguments:
    return OGPSAArguments(**{"ogpsa_reference": "a", "ogpsa_method": "null_space", **keys}, stage="ogpsa_sft")


# ---- alpha = 0 --------------------------------------------------------------------------------
def test_alpha_zero_freezes_a_rank_deficient_layer():
    """d = 64 inputs from 16 rows: 48 eigenvalues are zero up to round-off (some negative, clamped
    to 0). alpha = 0 must still protect every direction: nothing of a gradient is kept."""
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    space = build_space(x.T @ x, 0.0)
    assert space.null_dim == 0 and space.kind == "null" and space.vectors.shape == (64, 0)
    g = torch.randn(32, 64)
    removed = project_rows_(g, space)
    assert torch.count_nonzero(g) == 0 and removed > 0
    # a tiny alpha still finds the 48 directions no row reaches
    assert build_space(x.T @ x, 1e-6).null_dim == 48


# ---- ZeRO's flat pieces ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["null", "range"])
def test_flat_pieces_cut_anywhere_project_as_whole_rows(kind):
    """A 5 x 7 matrix cut at elements 10, 12, 30 (row 1 spans three pieces, the last piece is inside one
    row, one rank holds nothing): each piece projected, anchored and restored with the cut rows summed
    over the pieces (as the ranks' all-reduce does) equals the whole-matrix operations."""
    from ogpsa.plugin.methods.null_space.maths import (
        RowCut,
        anchor,
        anchor_piece,
        project_piece_,
        restore_,
        restore_piece_,
        split_rows,
    )

    torch.manual_seed(0)
    x = torch.randn(4 if kind == "null" else 2, 7)  # few inputs: a wide null space (stored as "null" basis)
    space = build_space(x.T @ x, 1e-3)
    if space.kind != kind:  # the narrower basis is stored: ask for the other one with more inputs
        x = torch.randn(6, 7)
        space = build_space(x.T @ x, 1e-3)
    assert space.kind == kind
    pieces = [(0, 10), (10, 12), (12, 30), (30, 30), (30, 35)]
    cuts = [RowCut(7, a, b, split_rows(pieces, 7)) for a, b in pieces]
    assert cuts[0].split == (1, 4)

    def run(op, whole):
        """op(flat, cut, reduce) on every piece; each reduce returns the sum of every piece's tensor in
        that call (found by a first pass with the pieces' own tensors), as the all-reduce does."""
        flats = [whole.reshape(-1)[a:b].clone() if b > a else None for a, b in pieces]
        calls = []
        for flat, cut in zip(flats, cuts):
            mine = []
            op(None if flat is None else flat.clone(), cut, lambda t, mine=mine: (mine.append(t.clone()), t)[1])
            calls.append(mine)
        totals = [sum(c[q] for c in calls) for q in range(len(calls[0]))]
        outs = []
        for n, (flat, cut) in enumerate(zip(flats, cuts)):
            feed = iter([t.clone() for t in totals])
            outs.append(op(flat, cut, lambda t: next(feed), n))
        return torch.cat([f for f in flats if f is not None]).view_as(whole), outs

    w = torch.randn(5, 7)
    projected, removed = run(lambda f, c, r, n=0: project_piece_(f, c, space, r, "cpu"), w)
    expected = w.clone()
    whole_removed = project_rows_(expected, space)
    assert torch.allclose(projected, expected, atol=1e-6)
    assert sum(removed) == pytest.approx(whole_removed**2, rel=1e-5)

    _, kept = run(lambda f, c, r, n=0: anchor_piece(f, c, space, r, "cpu"), w)
    stepped = w + 0.1 * torch.randn(5, 7)
    restored, _ = run(lambda f, c, r, n=0: restore_piece_(f, c, space, kept[n], r, "cpu"), stepped)
    expected = stepped.clone()
    restore_(expected, space, anchor(w, space))
    assert torch.allclose(restored, expected, atol=1e-6)
    assert not torch.allclose(restored, stepped, atol=1e-3)  # the step's range part was taken out


# ---- refusals ---------------------------------------------------------------------------------
REFUSED = {
    "dora": ({"finetuning_type": "lora", "use_dora": True}, {}, "use_dora: ogpsa_method=null_space does not support"),
    "dora_default_lora": ({"use_dora": True}, {}, "use_dora: ogpsa_method=null_space does not support DoRA"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_null_space_lora_variants_are_refused(case):
    from ogpsa.plugin.engines import check_arguments

    args, keys, message = REFUSED[case]
    with pytest.raises(OGPSAConfigError, match=re.escape("x.yaml: " + message)):
        check_arguments(args.get, null_settings(**keys), "x.yaml: ")


@pytest.mark.parametrize("args,keys", [({"finetuning_type": "full"}, {"ogpsa_refresh_steps": 5}),
                                       ({"finetuning_type": "lora"}, {"ogpsa_refresh_steps": 0}),
                                       ({"finetuning_type": "lora"}, {}),
                                       ({"finetuning_type": "full", "use_dora": True}, {})])
def test_null_space_set_ups_that_hold_pass(args, keys):
    from ogpsa.plugin.engines import check_arguments

    check_arguments(args.get, null_settings(**keys), "")


@pytest.mark.parametrize("fsdp", ["full_shard offload auto_wrap", ["full_shard", "offload"]])
def test_fsdp2_cpu_offload_is_refused(fsdp):
    from ogpsa.plugin.engines import check_arguments

    settings = OGPSAArguments(ogpsa_reference="a", stage="ogpsa_sft")
    with pytest.raises(OGPSAConfigError, match=re.escape("x.yaml: fsdp: CPU offload is not supported by OGPSA")):
        check_arguments({"fsdp": fsdp, "fsdp_config": {"version": 2}}.get, settings, "x.yaml: ")
    check_arguments({"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}.get, settings, "")


def test_lora_rebuild_keeps_the_adapter_and_holds_the_new_reference_outputs(tiny):
    """A rebuild after B has moved (`ogpsa_refresh_steps > 0` under LoRA) keeps B A as it is (the build
    changes no weight), then constrains what follows: A's gradient onto the new null space, B's onto the
    rank-space directions A does not carry into the new reference range (`maths.adapter_space`). After
    three more AdamW steps, every layer's change of B A on the reference inputs at the rebuild stays
    within the bound derived there, while the same steps unconstrained move those outputs far more."""
    import copy

    from helpers import SAMPLES
    from ogpsa.plugin.constraint import SetupContext
    from ogpsa.plugin.methods.null_space.method import NullSpace
    from ogpsa.plugin.sharding import Replicated
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.constraint import BuildContext

    refs, make_collator = tokenized_references(tiny["model"], tiny, REFS, SAMPLES)
    (train,), _ = tokenized_references(tiny["model"], tiny, ["toy_safety_sft"], 8)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["gate_proj", "up_proj", "down_proj"]))
    collator = make_collator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    constraint = NullSpace(null_settings(ogpsa_null_alpha=5e-3, ogpsa_null_layers="mlp", ogpsa_refresh_steps=3))
    constraint.setup(SetupContext(model, params, Replicated(params), True))

    def build(step):
        return constraint.build(BuildContext(model, refs, collator, step, 1, True, False,
                                             lambda label, sets=None: (4, tqdm(total=0, disable=True))))

    def steps(net, optimizer, first, project):
        for step in range(first, first + 3):
            batch = collator([dict(f) for f in train.features[2 * (step % 4): 2 * (step % 4) + 2]])
            net(**batch).loss.backward()
            if project:
                constraint.project_grad(0, True)
            optimizer.step()
            if project:
                constraint.project_step(0)
            optimizer.zero_grad(set_to_none=True)

    def products(net):
        out = {}
        for name, m in net.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                out[name] = (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone())
        return out

    assert build(0)["lora_a_moved"] > 0  # a fresh adapter: A <- A P
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    steps(model, optimizer, 0, True)
    before = products(model)
    plain = copy.deepcopy(model)  # the counterfactual: the same steps from here, unconstrained
    plain_optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    plain_optimizer.load_state_dict(optimizer.state_dict())

    event = build(3)  # B has moved: a rebuild of a trained adapter
    trained = {n for n, (b, _) in before.items() if bool(b.ne(0).any())}  # a layer whose null space is empty has A = 0
    assert event["lora_trained_layers"] == len(trained) >= 2 and event["lora_a_moved"] == 0.0
    assert 0 < event["lora_b_free_dims"] <= event["lora_b_dims"] == 4 * len(trained)
    after = products(model)
    assert all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)

    inputs: dict[str, list] = {layer.name: [] for layer in constraint.layers}  # the reference inputs now
    mask = {}
    hooks = [layer.module.register_forward_hook(
        lambda m, inp, out, n=layer.name: inputs[n].append(inp[0][mask["m"]].double())) for layer in constraint.layers]
    with torch.no_grad():
        for ref in refs:
            for f in ref.features:
                batch = collator([dict(f)])
                mask["m"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    steps(model, optimizer, 3, True)
    steps(plain, plain_optimizer, 3, False)
    end, free = products(model), products(plain)
    for layer in constraint.layers:
        name = layer.name
        if name not in trained:
            continue
        x = torch.cat(inputs[layer.name])
        (b0, a0), (b1, a1), (bp, ap) = [[t.double() for t in p[name]] for p in (before, end, free)]
        tau = constraint.spaces[layer.space].threshold
        leak = float(((b1 @ a1 - b0 @ a0) @ x.T).norm())
        bound = tau**0.5 * (float(((b1 - b0) @ a0).norm()) + float(torch.linalg.matrix_norm(b1, 2)) * float((a1 - a0).norm()))
        plain_leak = float(((bp @ ap - b0 @ a0) @ x.T).norm())
        print(f"{layer.name}: leak {leak:.3e} bound {bound:.3e} unconstrained {plain_leak:.3e}")
        assert leak <= 1.01 * bound + 1e-6
        assert plain_leak > 3 * leak
        assert float((b1 - b0).norm()) > 0  # B still learns


# ---- MoE --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe(tiny, tmp_path_factory) -> dict[str, str]:
    """A random tiny Qwen2-MoE (hidden 64, 2 layers, 4 experts, top-2, a shared expert) with the tiny
    model's tokenizer, and the toy data."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    out = tmp_path_factory.mktemp("moe") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"model": str(out), "data": tiny["data"]}


def _moe_model(moe, train_experts: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe["model"], dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad = train_experts or ".experts." not in name and ".mlp.gate." not in name
    return model


def test_moe_shared_expert_covariances_from_flattened_inputs(moe):
    """The shared expert reads (b*s, d) rows: its covariances are those of the non-padding positions,
    equal to X^T X computed here one sample at a time (no padding at all)."""
    model = _moe_model(moe, train_experts=False)
    layers = constrained_layers(model, "mlp")
    assert [la.name for la in layers] == [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in (
        "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate")]
    assert unconstrained_weights(model, "mlp", layers) == []
    sets, make_collator = tokenized_references(moe["model"], moe, REFS, 3)
    collator = make_collator(model)
    covs, tokens, _ = input_spaces(model, layers, sets, collator, 4, torch.device("cpu"), lambda c: c.clone())
    # gate, up and the shared expert's gate read the block's flattened input: one space; down its own
    assert [la.space for la in layers] == [0, 0, 1, 0, 2, 2, 3, 2] and len(covs) == 4
    rows = {la.name: [] for la in layers}

    def keep(name):
        return lambda module, inputs, output: rows[name].append(inputs[0].reshape(-1, inputs[0].shape[-1]))

    hooks = [la.module.register_forward_hook(keep(la.name)) for la in layers]
    with torch.no_grad():
        for ref in sets:
            for f in ref.features:
                model(**{k: v for k, v in collator([dict(f)]).items() if k != "labels"})
    for h in hooks:
        h.remove()
    assert sum(t["input"] for t in tokens.values()) == sum(len(f["input_ids"]) for r in sets for f in r.features)
    for layer in layers:
        x = torch.cat(rows[layer.name]).double()
        want = x.T @ x
        assert float((covs[layer.space].double() - want).norm() / want.norm()) < 1e-5, layer.name


def test_moe_with_training_experts_is_refused(moe):
    """Full fine-tuning trains the fused 3-D expert weights and the router, which no linear hook covers."""
    model = _moe_model(moe, train_experts=True)
    loose = unconstrained_weights(model, "mlp", constrained_layers(model, "mlp"))
    assert loose == [f"model.layers.{i}.mlp.{n}" for i in range(2)
                     for n in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")]


@pytest.mark.long  # ~40 s; test_moe_with_training_experts_is_refused covers the default suite
def test_moe_full_fine_tuning_is_refused_with_one_line(moe, tmp_path):
    out = tmp_path / "out"
    keys = ogpsa_keys(ogpsa_method="null_space", ogpsa_reference_samples=2, ogpsa_refresh_steps=0)
    proc = run_cli(base_config(moe, out, max_steps=1, **keys), tmp_path / "run", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ogpsa: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert ("ogpsa_null_layers: model.layers.0.mlp.gate.weight (6 such weights) is a trainable 4x64 weight"
            in errors[0]) and "refuses MoE models whose experts or routers train" in errors[0]
    assert "Traceback" not in proc.stderr and not (out / "model.safetensors").exists()


@pytest.mark.long  # kept out of the default suite's 15-minute budget
def test_moe_lora_null_space_trains_and_holds_the_shared_expert(moe, tmp_path):
    """LoRA on every linear layer of the MoE model (experts and router frozen): the run trains, and
    each shared-expert adapter A stays in the null space of its (flattened) reference inputs."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    keys = ogpsa_keys(ogpsa_method="null_space", ogpsa_reference_samples=4, ogpsa_refresh_steps=0,
                      ogpsa_null_alpha=0.05)
    run_cli(base_config(moe, out, finetuning_type="lora", lora_target="all", max_steps=3, optim="adamw_torch",
                        learning_rate=1e-2, **keys), tmp_path / "run")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    model = _moe_model(moe, train_experts=False)
    sets, make_collator = tokenized_references(moe["model"], moe, REFS, 4)
    collator = make_collator(model)
    name = "model.layers.1.mlp.shared_expert.down_proj"
    rows = []
    hook = model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output: rows.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.no_grad():
        for ref in sets:
            for f in ref.features:
                model(**{k: v for k, v in collator([dict(f)]).items() if k != "labels"})
    hook.remove()
    x = torch.cat(rows).double()
    eig = torch.linalg.eigvalsh(x.T @ x).clamp_min(0)
    a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
    bound = float(torch.linalg.matrix_norm(a, ord=2)) * float(eig[eig <= 0.05 * eig[-1]].sum()) ** 0.5
    assert float((a @ x.T).norm()) <= bound * (1 + 1e-4) + 1e-6 * float(x.norm())


# ---- memory -----------------------------------------------------------------------------------
def _peak_allocated(fn):
    """(fn's result, the peak of CPU bytes allocated and not yet freed while fn ran), from the profiler's
    record of every allocation and free."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak


@pytest.fixture(scope="module")
def wide_model(tiny, tmp_path_factory) -> dict[str, str]:
    """The tiny model at hidden size 384 (MLP inputs 384 and 768): the eigendecompositions, not the
    forward's activations, then dominate a rebuild's memory, as at 7B."""
    from ogpsa.data_prep.tiny import write_model

    return {"model": str(write_model(tmp_path_factory.mktemp("wide384"), hidden=384)), "data": tiny["data"]}


@pytest.mark.parametrize("budget", [None, 1])
def test_rebuild_peak_memory_is_the_formula(wide_model, budget):
    """The rebuild holds at most `peak_bytes(plan, kept)` beyond one reference forward, and that bound
    is tight (within the forward's own allocations). budget=1: one input per pass (4 passes), the
    same spaces as one pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_model["model"], dtype=torch.float32)
    layers = constrained_layers(model, "mlp")
    sets, make_collator = tokenized_references(wide_model["model"], wide_model, REFS, 2)
    collator = make_collator(model)

    def rebuild():
        return input_spaces(model, layers, sets, collator, 4, torch.device("cpu"),
                            lambda c: build_space(c, 5e-5, free_input=True), pass_budget=budget)

    (spaces, _, plan), peak = _peak_allocated(rebuild)

    def forwards():  # what the model's own forward of one set's batch allocates at most
        with torch.no_grad():
            for ref in sets:
                model(**{k: v for k, v in collator([dict(f) for f in ref.features]).items() if k != "labels"})

    _, forward = _peak_allocated(forwards)
    tokens = max(len(f["input_ids"]) for ref in sets for f in ref.features)
    forward += 4 * 2 * tokens * 768  # the hooks' float32 copy of the widest input's real rows
    kept = [s.nbytes() for s in spaces]
    bound = peak_bytes(plan, kept, forward)
    dims = [s.dim for s in spaces]
    everything = sum(4 * d * d for d in dims) + 32 * max(dims) ** 2  # all covariances alive through the largest eigh
    print(f"budget {budget}: {len(plan.passes)} passes, peak {peak / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB, "
          f"forward {forward / 2**20:.2f} MiB, all covariances + eigh {everything / 2**20:.2f} MiB")
    assert dims == [384, 768, 384, 768]
    assert len(plan.passes) == (1 if budget is None else 4)
    assert peak <= bound
    assert peak >= peak_bytes(plan, kept) - 64 * 1024  # the bound is what the eigendecompositions really hold
    if budget == 1:  # each pass holds one covariance: at each eigh, only the earlier results besides it
        assert peak_bytes(plan, kept) == max(sum(kept[:i]) + 32 * d * d + 128 * d for i, d in enumerate(dims))
        assert peak < everything


def test_one_input_per_pass_collects_the_same_covariances(tiny):
    """Four passes, each stopping its forwards once its input is read, sum exactly what one pass does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    layers = constrained_layers(model, "mlp")
    sets, make_collator = tokenized_references(tiny["model"], tiny, REFS, 3)
    runs = [input_spaces(model, layers, sets, make_collator(model), 2, torch.device("cpu"), lambda c: c.clone(),
                         pass_budget=budget) for budget in (None, 1)]
    (one, tokens_one, plan_one), (four, tokens_four, plan_four) = runs
    assert len(plan_one.passes) == 1 and plan_four.passes == [[0], [1], [2], [3]]
    assert tokens_one == tokens_four and len(one) == len(four) == 4
    assert all(torch.equal(a, b) for a, b in zip(one, four))
