"""The null-space method where large runs go: MoE blocks, 7B-sized covariances, alpha = 0, and the
set-ups it refuses (FSDP2 CPU offload, DoRA, LoRA rebuilds).

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


# ---- refusals ---------------------------------------------------------------------------------
REFUSED = {
    "dora": ({"finetuning_type": "lora", "use_dora": True}, {}, "use_dora: ogpsa_method=null_space does not support"),
    "dora_default_lora": ({"use_dora": True}, {}, "use_dora: ogpsa_method=null_space does not support DoRA"),
    "lora_refresh": ({"finetuning_type": "lora"}, {"ogpsa_refresh_steps": 5},
                     "ogpsa_refresh_steps: ogpsa_method=null_space under LoRA builds once (0)"),
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


def test_a_trained_lora_b_refuses_a_rebuild(tiny):
    """A rebuild's A <- A P is only harmless while B = 0; with a moved B (a resume without a saved null
    space, an adapter trained before) the rebuild refuses before it collects anything."""
    from ogpsa.plugin.methods.null_space.method import NullSpace
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    constraint = NullSpace(null_settings())
    constraint.layers = constrained_layers(model, "mlp")
    constraint.check_lora_b(3)  # a fresh adapter: B = 0
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[0, 0] = 0.1
    with pytest.raises(OGPSAConfigError, match=r"layers\.1\.mlp\.up_proj's LoRA B is not zero at step 3"):
        constraint.check_lora_b(3)


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
