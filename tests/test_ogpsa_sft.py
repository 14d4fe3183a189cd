"""ogpsa_sft end to end through the stock `llamafactory-cli train` (and the `ogpsa` command)."""

import json

import pytest
from helpers import REFS, base_config, load_state, log_history, ogpsa_keys, ogpsa_log, reference_losses, run_cli



def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_first_order_preservation_sft(tiny, tmp_path):
    """Plain SGD, constant LR, rebuild every step: reference losses barely move under ogpsa_sft."""
    names = REFS + ["toy_safety_sft"]
    start = reference_losses(tiny["model"], tiny, names)
    change = {}
    runs = (("plain", {}), ("ogpsa", ogpsa_keys()), ("bf16_basis", ogpsa_keys(ogpsa_basis_dtype="bfloat16")))
    for kind, extra in runs:
        out = tmp_path / kind
        cfg = base_config(tiny, out, optim="sgd", learning_rate=0.05, max_steps=4, max_grad_norm=0.0, **extra)
        run_cli(cfg, tmp_path / f"run_{kind}")
        after = reference_losses(str(out), tiny, names)
        change[kind] = {n: after[n] - start[n] for n in names}
    worst = {kind: max(abs(change[kind][n]) for n in REFS) for kind, _ in runs}
    plain_ref, ogpsa_ref = worst["plain"], worst["ogpsa"]
    print(f"largest reference-loss change: plain {plain_ref:.5f}, ogpsa {ogpsa_ref:.5f}, bf16 basis "
          f"{worst['bf16_basis']:.5f}; safety loss change under ogpsa {change['ogpsa']['toy_safety_sft']:.4f}")
    assert plain_ref > 0.05, "the learning rate must visibly move the reference losses under plain SFT"
    assert ogpsa_ref * 10 <= plain_ref
    assert change["ogpsa"]["toy_safety_sft"] < -0.1  # the safety loss still falls
    # a bfloat16 basis (half the memory) beside float32 weights: still >= 10x steadier than plain
    assert worst["bf16_basis"] * 10 <= plain_ref and change["bf16_basis"]["toy_safety_sft"] < -0.1
    event = next(r for r in ogpsa_log(tmp_path / "bf16_basis") if r.get("event") == "rebuild")
    assert event["basis_bytes"] * 2 == next(r for r in ogpsa_log(tmp_path / "ogpsa") if r.get("event") == "rebuild")["basis_bytes"]


def test_update_target_keeps_first_order_preservation_under_adamw(tiny, tmp_path):
    """AdamW rescales the projected gradient per coordinate: projecting only the gradient (the paper)
    lets the reference losses move, projecting the update too (the default) holds them."""
    names = REFS + ["toy_safety_sft"]
    start = reference_losses(tiny["model"], tiny, names)
    change = {}
    runs = (("plain", {}), ("gradient", ogpsa_keys(ogpsa_target="gradient")), ("update", ogpsa_keys()))
    for kind, extra in runs:
        out = tmp_path / kind
        cfg = base_config(tiny, out, optim="adamw_torch", learning_rate=1e-3, max_steps=4, max_grad_norm=0.0, **extra)
        run_cli(cfg, tmp_path / f"run_{kind}")
        after = reference_losses(str(out), tiny, names)
        change[kind] = {n: after[n] - start[n] for n in names}
        if kind == "update":
            steps = [r for r in ogpsa_log(out) if "update_in_span_norm" in r]
            assert len(steps) == 4 and all(r["update_in_span_norm"] > 0 for r in steps)
    worst = {k: max(abs(change[k][n]) for n in REFS) for k, _ in runs}
    print("largest reference-loss change under AdamW: " + ", ".join(f"{k} {v:.5f}" for k, v in worst.items())
          + f"; safety loss change under update {change['update']['toy_safety_sft']:.4f}")
    assert worst["plain"] > 0.05
    assert worst["gradient"] > 0.02  # Adam's step leaves the orthogonal complement
    assert worst["update"] * 5 <= worst["gradient"] and worst["update"] * 20 <= worst["plain"]
    assert change["update"]["toy_safety_sft"] < -0.2  # the safety loss still falls


def test_plain_yaml_trains_exactly_as_stock(tiny, tmp_path):
    """A YAML without OGPSA keys: identical losses and weights with and without the activation."""
    cfg = base_config(tiny, None, max_steps=3)
    results = {}
    for label, env in (("armed", {}), ("disabled", {"OGPSA_DISABLE": "1"})):
        out = tmp_path / label
        run_cli({**cfg, "output_dir": str(out)}, tmp_path / f"run_{label}", env=env)
        results[label] = ([h["loss"] for h in log_history(out) if "loss" in h], load_state(out))
        assert not (out / "ogpsa_log.jsonl").exists()
    assert results["armed"][0] == results["disabled"][0]
    assert max_weight_diff(results["armed"][1], results["disabled"][1]) == 0.0


def test_observe_mode_leaves_training_bitwise_unchanged(tiny, tmp_path):
    """Rebuilding every step (forward/backward on reference data) must not leak into the update."""
    cfg = base_config(tiny, None, max_steps=3, optim="adamw_torch")
    plain, observed = tmp_path / "plain", tmp_path / "observe"
    run_cli({**cfg, "output_dir": str(plain)}, tmp_path / "r1")
    run_cli({**cfg, **ogpsa_keys(ogpsa_mode="observe"), "output_dir": str(observed)}, tmp_path / "r2")
    assert sum(1 for r in ogpsa_log(observed) if r.get("event") == "rebuild") == 3
    assert max_weight_diff(load_state(plain), load_state(observed)) == 0.0
    # ...while the observed run did measure a real overlap with the reference gradients
    steps = [r for r in ogpsa_log(observed) if "removed_fraction" in r]
    assert all(r["removed_fraction"] == 0.0 for r in steps)
    assert max(abs(r["cos/toy_general_ref"]) for r in steps) > 0.05


@pytest.mark.parametrize("finetuning", ["lora", "freeze"])
def test_lora_and_freeze_log_metrics(tiny, tmp_path, finetuning):
    extra = {"lora_target": "all", "lora_rank": 4} if finetuning == "lora" else {"freeze_trainable_layers": 1}
    out = tmp_path / "out"
    cfg = base_config(tiny, out, finetuning_type=finetuning, max_steps=4, learning_rate=1e-2,
                      **extra, **ogpsa_keys(ogpsa_refresh_steps=2))
    run_cli(cfg, tmp_path / "run")
    history = [h for h in log_history(out) if "loss" in h]
    assert len(history) == 4
    for h in history:
        assert 0.0 < h["ogpsa/removed_fraction"] < 1.0
        for name in REFS:
            assert abs(h[f"ogpsa/cos_after/{name}"]) < 1e-4
            assert -1.0 <= h[f"ogpsa/cos/{name}"] <= 1.0
    rebuilds = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    # LoRA: a follow-up rebuild at step 1 gives the A tensors (zero reference gradient while B = 0) directions
    assert [r["step"] for r in rebuilds] == ([0, 1, 2] if finetuning == "lora" else [0, 2])
    for r in rebuilds:
        assert r["seconds"] > 0 and all(r[f"grad_norm/{n}"] > 0 for n in REFS)
    if finetuning == "lora":
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter_model.safetensors"))
        trainable = sum(t.numel() for t in adapter.values())
        # the subspace lives on the adapter weights only (at most 3 directions x adapters)
        assert rebuilds[0]["param_numel"] == trainable
        assert 0 < rebuilds[0]["basis_bytes"] <= 3 * trainable * 4
    else:
        full = sum(t.numel() for t in load_state(out).values())
        assert 0 < rebuilds[0]["param_numel"] < full


def test_gradient_accumulation_1x8_equals_8x1(tiny, tmp_path):
    states = {}
    for label, bs, ga in (("1x8", 1, 8), ("8x1", 8, 1)):
        out = tmp_path / label
        cfg = base_config(tiny, out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2,
                          optim="sgd", learning_rate=0.05, max_grad_norm=0.0, **ogpsa_keys())
        run_cli(cfg, tmp_path / f"run_{label}")
        states[label] = load_state(out)
    start = load_state_from_model(tiny["model"])
    moved = max_weight_diff(states["8x1"], start)
    diff = max_weight_diff(states["1x8"], states["8x1"])
    print(f"max |w_1x8 - w_8x1| = {diff:.2e}, max update = {moved:.2e}")
    assert moved > 1e-3
    assert diff < 1e-3 * moved


def load_state_from_model(model_dir):
    return load_state(model_dir)


def test_ogpsa_command_with_overrides(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(tiny, out, max_steps=4, **ogpsa_keys(ogpsa_refresh_steps=0, ogpsa_granularity="global"))
    run_cli(cfg, tmp_path / "run", "ogpsa_refresh_steps=3", "ogpsa_mode=conflict", cli="ogpsa")
    log = ogpsa_log(out)
    assert [r["step"] for r in log if r.get("event") == "rebuild"] == [0, 3]
    assert all(r["projected_blocks"] in (0, 1) for r in log if "projected_blocks" in r)
    history = [h for h in log_history(out) if "loss" in h]
    assert all("ogpsa/removed_fraction" in h for h in history)


# ---- bad input: one clear line, exit code 2, nothing written to output_dir ---------------------

BAD = {
    "unknown_reference": ({"ogpsa_reference": "toy_math_ref,nope_ref"}, "'nope_ref' not found in"),
    "keys_on_stock_stage": ({"stage": "sft"}, "need `stage: ogpsa_sft` or `stage: ogpsa_dpo`"),
    "wrong_type": ({"ogpsa_refresh_steps": "often"}, "ogpsa_refresh_steps: expected an integer"),
    "unknown_key": ({"ogpsa_refresh": 3}, "ogpsa_refresh: unknown OGPSA key"),
    "bad_choice": ({"ogpsa_granularity": "layer"}, "ogpsa_granularity: expected one of ['tensor', 'global']"),
    "missing_reference": ({"ogpsa_reference": ""}, "ogpsa_reference: required"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_fail_before_training(tiny, tmp_path, case):
    keys, message = BAD[case]
    out = tmp_path / "out"
    cfg = base_config(tiny, out, max_steps=2, **{**ogpsa_keys(), **keys})
    proc = run_cli(cfg, tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_empty_reference_set_fails_before_training(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    info = json.loads((__import__("pathlib").Path(tiny["data"]) / "dataset_info.json").read_text())
    info["empty_ref"] = {"file_name": "empty_ref.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    (data / "empty_ref.json").write_text("[]")
    for name in info:
        src = __import__("pathlib").Path(tiny["data"]) / f"{name}.json"
        if src.exists():
            (data / src.name).write_text(src.read_text())
    out = tmp_path / "out"
    cfg = base_config(tiny, out, dataset_dir=str(data), max_steps=2, **ogpsa_keys(ogpsa_reference="toy_math_ref,empty_ref"))
    proc = run_cli(cfg, tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "reference set 'empty_ref' is empty" in proc.stderr
    assert not out.exists()


def test_non_finite_reference_gradient_fails_before_training(tiny, tmp_path):
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "nan_model"
    shutil.copytree(tiny["model"], model)
    state = load_state(model)
    key = next(k for k in state if "layers.1.mlp.down_proj" in k)
    state[key][0, 0] = float("inf")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    cfg = base_config(tiny, out, model_name_or_path=str(model), max_steps=2, **ogpsa_keys())
    proc = run_cli(cfg, tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not finite" in proc.stderr and "toy_math_ref" in proc.stderr
    assert not out.exists()
