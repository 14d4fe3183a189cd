"""`ogpsa_method: null_space` (NSPO) end to end through stock `llamafactory-cli train`.

The guarantee under test is exact, not first order: a constrained layer's weight change dW lies in
the null space N of its reference inputs X, so its outputs on them move by
    || dW X^T ||_F <= ||dW||_2 * sqrt(sum of the eigenvalues of X^T X that are <= alpha * lambda_max).
The tests recompute X from the starting model themselves (hooks, LLaMA-Factory's tokenisation)
and check that bound on the trained weights, independently of the plugin's own covariances.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import (
    ALPHA,
    MLP,
    PLAIN_ADAMW_3,
    PLAIN_ADAMW_4,
    REFS,
    base_config,
    load_state,
    log_history,
    null_energy,
    null_keys,
    ogpsa_log,
    reference_inputs,
    reference_losses,
    run_cli,
)


def test_layer_outputs_on_reference_inputs_stay_within_the_alpha_bound(tiny, tmp_path, trained):
    """AdamW, default update target: every MLP linear's outputs on the reference inputs move at most by
    the null-space bound, while plain SFT moves them freely and the safety loss still falls."""
    x = reference_inputs(tiny, MLP)
    start = load_state(Path(tiny["model"]))
    run_cli(base_config(tiny, tmp_path / "null", **PLAIN_ADAMW_4, **null_keys()), tmp_path / "run_null")
    changes = {"plain": load_state(trained(**PLAIN_ADAMW_4)), "null": load_state(tmp_path / "null")}
    losses = [r["loss"] for r in log_history(tmp_path / "null") if "loss" in r]
    assert losses[-1] < losses[0] - 0.1, losses  # the safety loss still falls
    for name in MLP:
        w0 = start[f"{name}.weight"].double()
        dw = changes["null"][f"{name}.weight"].double() - w0
        dw_plain = changes["plain"][f"{name}.weight"].double() - w0
        moved = float((dw @ x[name].T).norm())
        bound = float(torch.linalg.matrix_norm(dw, ord=2)) * null_energy(x[name], ALPHA) ** 0.5
        scale = float((w0 @ x[name].T).norm())
        assert float(dw.norm()) > 1e-4, f"{name} did not train"
        assert moved <= bound * (1 + 1e-4) + 1e-6 * scale, (name, moved, bound)
        # at this alpha half of each input space is free, and plain training still moves the outputs
        # on the reference inputs more than twice as far
        assert float((dw_plain @ x[name].T).norm()) > 2 * moved, name
    event = ogpsa_log(tmp_path / "null")[0]
    assert event["event"] == "rebuild" and event["method"] == "null_space" and event["spaces"] == 4
    assert 0 < event["null_dims"] < event["input_dims"]
    dims = [event[f"null_dim/{n}"] for n in MLP]
    # the stored basis is the narrower of null and range: min(k, d - k) columns of d float32 entries
    widths = {n: (64 if "down_proj" not in n else 128) for n in MLP}
    for n in MLP:
        k, d = event[f"null_dim/{n}"], widths[n]
        assert event[f"basis_bytes/{n}"] == min(k, d - k) * d * 4, n
    # gate and up read the same input: one shared space (and the same null dimension)
    assert dims[0] == dims[1] and dims[3] == dims[4]
    steps = [r for r in ogpsa_log(tmp_path / "null") if "update_in_range_norm" in r]
    assert len(steps) == 4 and all(r["update_in_range_norm"] > 0 for r in steps)  # Adam left N; taken back


@pytest.mark.long  # kept out of the default suite's 15-minute budget
def test_alpha_extremes_freeze_or_free_the_layers(tiny, tmp_path, trained):
    """alpha = 0: no null space, the constrained layers do not move at all (the others train);
    alpha = 1: everything is null space, training is bitwise that of plain SFT."""
    outs = {"plain": trained(**PLAIN_ADAMW_3), "a0": tmp_path / "a0", "a1": tmp_path / "a1"}
    for kind, alpha in (("a0", 0.0), ("a1", 1.0)):
        run_cli(base_config(tiny, outs[kind], **PLAIN_ADAMW_3, **null_keys(ogpsa_null_alpha=alpha)),
                tmp_path / f"run_{kind}")
    start, plain = load_state(Path(tiny["model"])), load_state(outs["plain"])
    frozen, free = load_state(outs["a0"]), load_state(outs["a1"])
    assert all(torch.equal(frozen[k], start[k]) for k in frozen if ".mlp." in k)
    assert any(not torch.equal(frozen[k], start[k]) for k in frozen if ".self_attn." in k)
    assert ogpsa_log(outs["a0"])[0]["null_dims"] == 0
    assert all(torch.equal(free[k], plain[k]) for k in free)
    event = ogpsa_log(outs["a1"])[0]
    assert event["null_dims"] == event["input_dims"] and event["basis_bytes"] == 0


@pytest.fixture(scope="module")
def wide(tiny, tmp_path_factory) -> dict[str, str]:
    """The tiny model at hidden size 512 (same tokenizer and data): one reference row per set (~330
    tokens) then spans only part of every layer's input space, as 300 real samples do at 7B scale."""
    from ogpsa.data_prep.tiny import write_model

    return {"model": str(write_model(tmp_path_factory.mktemp("wide"), hidden=512)), "data": tiny["data"]}


def test_lora_all_linear_keeps_reference_losses(wide, tmp_path):
    """LoRA on every linear layer, every one constrained, NSPO's alpha: A <- A P makes B A x ignore the
    reference inputs' range, so the reference losses move >= 10x less than plain LoRA while the safety
    loss falls."""
    names = REFS + ["toy_safety_sft"]
    start = reference_losses(wide["model"], wide, names, samples=1)
    lora = {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "optim": "adamw_torch",
            "learning_rate": 2e-3, "max_steps": 6, "max_grad_norm": 1.0}
    change = {}
    null = null_keys(ogpsa_null_layers="all_linear", ogpsa_null_alpha=5e-5, ogpsa_reference_samples=1)
    for kind, keys in {"plain": {}, "null": null}.items():
        out = tmp_path / kind
        run_cli(base_config(wide, out, **lora, **keys), tmp_path / f"run_{kind}")
        after = reference_losses(wide["model"], wide, names, adapter=str(out), samples=1)
        change[kind] = {n: after[n] - start[n] for n in names}
    worst = {k: max(abs(change[k][n]) for n in REFS) for k in change}
    print(f"largest reference-loss change: plain LoRA {worst['plain']:.5f}, null-space LoRA {worst['null']:.5f}; "
          f"safety loss change {change['null']['toy_safety_sft']:.4f}")
    assert worst["plain"] > 0.05
    assert worst["null"] * 10 <= worst["plain"]
    assert change["null"]["toy_safety_sft"] < -0.1
    event = ogpsa_log(tmp_path / "null")[0]
    assert event["layers"] == 14 and event["lora_a_moved"] > 0  # 7 linears x 2 layers; PEFT's random A moved


BAD = {  # in-process, as `llamafactory-cli train` checks them before launch (the contract: test_ogpsa_sft)
    "alpha_range": ({"ogpsa_null_alpha": 2}, "ogpsa_null_alpha: must be in [0, 1], got 2.0"),
    "alpha_type": ({"ogpsa_null_alpha": "small"}, "ogpsa_null_alpha: expected a number"),
    "span_key": ({"ogpsa_granularity": "global"}, "ogpsa_granularity: not used by ogpsa_method=null_space"),
    "null_key": ({"ogpsa_method": "gradient_span", "ogpsa_null_alpha": 0.1},
                 "ogpsa_null_alpha: not used by ogpsa_method=gradient_span"),
    "layers": ({"ogpsa_null_layers": " "}, "ogpsa_null_layers: 'mlp', 'all_linear' or comma-separated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_null_space_settings_are_named(case):
    """The same validation the command line runs before launch (`split_ogpsa_args`), without a process each."""
    from ogpsa.plugin.settings import OGPSAConfigError, split_ogpsa_args

    keys, message = BAD[case]
    with pytest.raises(OGPSAConfigError, match=re.escape(message)) as err:
        split_ogpsa_args({**null_keys(), **keys}, "x.yaml: ")
    assert str(err.value).startswith("x.yaml: ") and "\n" not in str(err.value)


def test_zero_and_fsdp2_are_accepted_for_null_space_and_their_refusals_still_apply():
    from ogpsa.plugin.engines import check_arguments
    from ogpsa.plugin.settings import OGPSAConfigError, split_ogpsa_args

    settings, _ = split_ogpsa_args(null_keys())
    for stage in (1, 2, 3):
        check_arguments({"deepspeed": {"zero_optimization": {"stage": stage}}}.get, settings)
    check_arguments({"fsdp": "full_shard", "fsdp_config": {"version": 2}}.get, settings)
    with pytest.raises(OGPSAConfigError, match="ZeRO offload|offload_optimizer"):
        check_arguments({"deepspeed": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}}.get,
                        settings)


@pytest.mark.long  # kept out of the default suite's 15-minute budget
def test_unknown_null_layers_fail_naming_the_key(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(base_config(tiny, out, max_steps=1, **null_keys(ogpsa_null_layers="ffn_in,ffn_out")),
                   tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ogpsa_null_layers: 'ffn_in,ffn_out' matches no trainable linear layer" in proc.stderr
    assert not (out / "model.safetensors").exists()


@pytest.mark.long  # kept out of the default suite's 15-minute budget
def test_null_space_dpo_with_lora(tiny, tmp_path):
    """ogpsa_dpo + LoRA: LLaMA-Factory's DPO workflow, every adapter A kept in its null space."""
    out = tmp_path / "out"
    keys = {"dataset": "toy_safety_dpo", "pref_beta": 0.1, "finetuning_type": "lora", "lora_target": "all",
            "max_steps": 3, "learning_rate": 1e-2, "optim": "adamw_torch",
            **null_keys(stage="ogpsa_dpo", ogpsa_null_layers="all_linear")}
    cfg = base_config(tiny, out, **keys)
    run_cli(cfg, tmp_path / "run")
    log = ogpsa_log(out)
    assert [r["step"] for r in log if r.get("event") == "rebuild"] == [0]  # null_space builds once by default
    assert [r["step"] for r in log if "removed_fraction" in r] == [1, 2, 3]
    names = [k.split("null_dim/")[1] for k in log[0] if k.startswith("null_dim/")]
    x = reference_inputs(tiny, [n.replace("base_model.model.", "") for n in names if "layers.1." in n])
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    for name, rows in x.items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        bound = float(torch.linalg.matrix_norm(a, ord=2)) * null_energy(rows, ALPHA) ** 0.5
        assert float((a @ rows.T).norm()) <= bound * (1 + 1e-4) + 1e-6 * float(rows.norm()), name
    history = [r for r in log_history(out) if "loss" in r]
    assert all("ogpsa/removed_fraction" in r for r in history)


@pytest.mark.long  # one CLI run; test_null_space_scale checks the rebuild's maths in the default suite
def test_lora_null_space_rebuilds_through_the_command_line(tiny, tmp_path):
    """ogpsa_refresh_steps > 0 under LoRA: stock `llamafactory-cli train` rebuilds at step 2 with B moved,
    keeps the adapter as it is there and constrains its B to the logged free directions."""
    out = tmp_path / "out"
    keys = {"finetuning_type": "lora", "lora_target": "all", "max_steps": 4, "learning_rate": 1e-2,
            "optim": "adamw_torch", **null_keys(ogpsa_refresh_steps=2, ogpsa_null_layers="all_linear")}
    run_cli(base_config(tiny, out, **keys), tmp_path / "run")
    rebuilds = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    assert [r["step"] for r in rebuilds] == [0, 2]
    assert rebuilds[0]["lora_a_moved"] > 0 and "lora_trained_layers" not in rebuilds[0]
    assert rebuilds[1]["lora_a_moved"] == 0.0 and rebuilds[1]["lora_trained_layers"] > 0
    assert 0 < rebuilds[1]["lora_b_free_dims"] <= rebuilds[1]["lora_b_dims"]
    assert [r["step"] for r in ogpsa_log(out) if "removed_fraction" in r] == [1, 2, 3, 4]
