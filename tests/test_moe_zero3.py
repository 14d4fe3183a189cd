"""ZeRO-3 with MoE leaf modules: a tiny Qwen2-MoE, one torchrun rank, CPU (`-m multiprocess`).

Under ZeRO-3 LLaMA-Factory marks each MoE block as a DeepSpeed leaf module
(`set_z3_leaf_modules`); DeepSpeed then reduces the block's gradients from a full backward hook on
the module instead of per-parameter hooks. The rebuild must take those hooks out too: otherwise
the reference backward feeds ZeRO's gradient bucket (the next training backward then fails with
duplicate parameters in the bucket, or the reference gradient leaks into the update) and the
experts' reference gradients are taken away from the basis. The run must train, and build the
basis a run without DeepSpeed builds from the same weights.
"""

import json
import shutil

import pytest
from helpers import REFS, base_config, deepspeed_config, load_state, ogpsa_keys, ogpsa_log, run_cli

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny_moe(tiny, tmp_path_factory):
    """The tiny Qwen2's tokenizer with a random 2-layer Qwen2-MoE (4 experts, top 2, a shared expert)."""
    import torch
    from transformers import AutoConfig, Qwen2MoeConfig, Qwen2MoeForCausalLM

    dense = AutoConfig.from_pretrained(tiny["model"])
    config = Qwen2MoeConfig(
        vocab_size=dense.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("moe") / "model"
    Qwen2MoeForCausalLM(config).save_pretrained(out)
    for f in tiny_model_files(tiny["model"]):
        shutil.copy(f, out / f.name)
    return {**tiny, "model": str(out)}


def tiny_model_files(model_dir):
    from pathlib import Path

    return [f for f in Path(model_dir).iterdir() if "token" in f.name or f.name.startswith(("vocab", "merges"))]


def test_zero3_moe_leaf_modules_train_and_build_the_plain_basis(tiny_moe, tmp_path):
    ds = tmp_path / "ds_z3.json"
    ds.write_text(json.dumps(deepspeed_config(3)))
    runs = {}
    for label, keys, env in (("plain", {}, None),
                             ("zero3", {"deepspeed": str(ds), "ddp_backend": "gloo"},
                              {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})):
        out = tmp_path / label
        cfg = base_config(tiny_moe, out, per_device_train_batch_size=4, max_samples=8, max_steps=2, optim="sgd",
                          learning_rate=0.05, max_grad_norm=0.0, **keys, **ogpsa_keys(ogpsa_reference_samples=8))
        run_cli(cfg, tmp_path / f"run_{label}", env=env)  # a rebuild before each of the 2 steps
        runs[label] = out
    plain, zero3 = ([r for r in ogpsa_log(runs[k]) if r.get("event") == "rebuild"] for k in ("plain", "zero3"))
    assert [r["step"] for r in zero3] == [0, 1] and zero3[0]["engine"] == "zero3"
    assert zero3[0]["rank"] == plain[0]["rank"] == 3 and zero3[0]["param_numel"] == plain[0]["param_numel"]
    for name in REFS:  # the experts' reference gradients are in the basis, as without DeepSpeed
        assert zero3[0][f"grad_norm/{name}"] == pytest.approx(plain[0][f"grad_norm/{name}"], rel=1e-5)
    # and no reference gradient reached the update: the trained weights match the run without DeepSpeed
    start, a, b = load_state(tiny_moe["model"]), load_state(runs["plain"]), load_state(runs["zero3"])
    update = max(float((a[k] - start[k]).abs().max()) for k in a)
    gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"MoE ZeRO-3 vs plain: gap {gap:.2e}, update {update:.2e}")
    assert update > 1e-3 and gap <= 1e-4 * update
