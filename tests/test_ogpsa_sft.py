"""ogpsa_sft end to end through the stock `llamafactory-cli train` (and the `ogpsa` command)."""

import json
import shutil

import pytest
from helpers import (
    PLAIN_ADAMW_3,
    PLAIN_ADAMW_4,
    REFS,
    assert_projection_logged,
    assert_refused,
    base_config,
    load_state,
    log_history,
    ogpsa_keys,
    ogpsa_log,
    reference_losses,
    run_cli,
)


# plain SGD, constant LR, 4 steps, no clipping: the first-order preservation runs (the OGPSA one, rebuilt
# every step, is also the 4x1 side of the gradient accumulation check)
SGD = {"optim": "sgd", "learning_rate": 0.05, "max_steps": 4, "max_grad_norm": 0.0}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_first_order_preservation_sft(tiny, tmp_path, trained, start_losses):
    """Plain SGD, constant LR, rebuild every step: reference losses barely move under ogpsa_sft."""
    names = REFS + ["toy_safety_sft"]
    start = start_losses
    change, outs = {}, {}
    runs = (("plain", {}), ("ogpsa", ogpsa_keys()), ("bf16_basis", ogpsa_keys(ogpsa_basis_dtype="bfloat16")))
    for kind, extra in runs:
        if kind == "bf16_basis":
            outs[kind] = tmp_path / kind
            run_cli(base_config(tiny, outs[kind], **SGD, **extra), tmp_path / f"run_{kind}")
        else:  # shared: the plain baseline, and the OGPSA run the accumulation check compares against
            outs[kind] = trained(**SGD, **extra)
        after = reference_losses(str(outs[kind]), tiny, names)
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
    event = next(r for r in ogpsa_log(outs["bf16_basis"]) if r.get("event") == "rebuild")
    assert event["basis_bytes"] * 2 == next(r for r in ogpsa_log(outs["ogpsa"]) if r.get("event") == "rebuild")["basis_bytes"]


def test_update_target_keeps_first_order_preservation_under_adamw(tiny, tmp_path, trained, start_losses):
    """AdamW rescales the projected gradient per coordinate: projecting only the gradient (the paper)
    lets the reference losses move, projecting the update too (the default) holds them."""
    names = REFS + ["toy_safety_sft"]
    start = start_losses
    change = {}
    runs = (("plain", {}), ("gradient", ogpsa_keys(ogpsa_target="gradient")), ("update", ogpsa_keys()))
    for kind, extra in runs:
        out = trained(**PLAIN_ADAMW_4) if kind == "plain" else tmp_path / kind
        if kind != "plain":
            run_cli(base_config(tiny, out, **PLAIN_ADAMW_4, **extra), tmp_path / f"run_{kind}")
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


def test_plain_yaml_trains_exactly_as_stock(tiny, tmp_path, trained):
    """A YAML without OGPSA keys: identical losses and weights with and without the activation."""
    results = {}
    for label, env in (("armed", {}), ("disabled", {"OGPSA_DISABLE": "1"})):
        if label == "armed":  # the shared plain baseline: every test process runs with the activation armed
            out = trained(**PLAIN_ADAMW_3)
        else:
            out = tmp_path / label
            run_cli(base_config(tiny, out, **PLAIN_ADAMW_3), tmp_path / f"run_{label}", env=env)
        results[label] = ([h["loss"] for h in log_history(out) if "loss" in h], load_state(out))
        assert not (out / "ogpsa_log.jsonl").exists()
    assert len(results["armed"][0]) == 3 and results["armed"][0] == results["disabled"][0]
    assert max_weight_diff(results["armed"][1], results["disabled"][1]) == 0.0


def test_observe_mode_leaves_training_bitwise_unchanged(tiny, tmp_path, trained):
    """Rebuilding every step (forward/backward on reference data) must not leak into the update."""
    plain, observed = trained(**PLAIN_ADAMW_3), tmp_path / "observe"
    run_cli(base_config(tiny, observed, **PLAIN_ADAMW_3, **ogpsa_keys(ogpsa_mode="observe")), tmp_path / "r2")
    assert sum(1 for r in ogpsa_log(observed) if r.get("event") == "rebuild") == 3
    assert max_weight_diff(load_state(plain), load_state(observed)) == 0.0
    # ...while the observed run did measure a real overlap with the reference gradients
    steps = [r for r in ogpsa_log(observed) if "removed_fraction" in r]
    assert all(r["removed_fraction"] == 0.0 for r in steps)
    assert max(abs(r["cos/toy_general_ref"]) for r in steps) > 0.05


def test_freeze_logs_metrics(tiny, tmp_path):
    """Freeze tuning: the subspace lives on the trainable layers only. (LoRA's metrics and adapter-sized
    basis: test_lora_first_step.)"""
    out = tmp_path / "out"
    cfg = base_config(tiny, out, finetuning_type="freeze", freeze_trainable_layers=1, max_steps=4, learning_rate=1e-2,
                      **ogpsa_keys(ogpsa_refresh_steps=2))
    run_cli(cfg, tmp_path / "run")
    rebuilds = assert_projection_logged(out, 4)
    assert [r["step"] for r in rebuilds] == [0, 2]
    full = sum(t.numel() for t in load_state(out).values())
    assert 0 < rebuilds[0]["param_numel"] < full


def test_gradient_accumulation_1x4_equals_4x1(tiny, tmp_path, trained):
    """4 micro-batches of 1 train as 1 batch of 4 (the 4x1 run: the first-order preservation's)."""
    states = {"4x1": load_state(trained(**SGD, **ogpsa_keys()))}
    out = tmp_path / "1x4"
    run_cli(base_config(tiny, out, **{**SGD, **ogpsa_keys(), "per_device_train_batch_size": 1,
                                      "gradient_accumulation_steps": 4}), tmp_path / "run_1x4")
    states["1x4"] = load_state(out)
    start = load_state(tiny["model"])
    moved = max_weight_diff(states["4x1"], start)
    diff = max_weight_diff(states["1x4"], states["4x1"])
    print(f"max |w_1x4 - w_4x1| = {diff:.2e}, max update = {moved:.2e}")
    assert moved > 1e-3
    assert diff < 1e-3 * moved


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
# The messages are checked in this process (`preflight`, which `llamafactory-cli train x.yaml` runs
# before launch, and the reference tokenisation of the callback); one process per contract checks the
# exit code, the single line and the untouched output_dir.

KNOWN = ("['ogpsa_basis_dtype', 'ogpsa_directions_per_set', 'ogpsa_granularity', 'ogpsa_keep_previous', "
         "'ogpsa_method', 'ogpsa_mode', 'ogpsa_null_alpha', 'ogpsa_null_energy', 'ogpsa_null_layers', 'ogpsa_reference', "
         "'ogpsa_reference_batch_size', 'ogpsa_reference_rotation', 'ogpsa_reference_samples', 'ogpsa_refresh_steps', "
         "'ogpsa_save_basis', "
         "'ogpsa_target']")
REGISTERED = ("toy_benign_eval, toy_dpo_chosen, toy_general_eval, toy_general_ref, toy_harmful_eval, toy_hhh_eval, "
              "toy_hhh_ref, toy_math_eval, toy_math_ref, toy_safety_dpo, toy_safety_sft")
BAD = {
    "unknown_reference": ({"ogpsa_reference": "toy_math_ref,nope_ref"},
                          "ogpsa_reference: 'nope_ref' not found in {data}/dataset_info.json (registered: "
                          + REGISTERED + ")"),
    "keys_on_stock_stage": ({"stage": "sft"}, "ogpsa_reference, ogpsa_reference_samples, ogpsa_refresh_steps: "
                            "ogpsa_* keys need `stage: ogpsa_sft` or `stage: ogpsa_dpo`, but the stage is 'sft'"),
    "wrong_type": ({"ogpsa_refresh_steps": "often"}, "ogpsa_refresh_steps: expected an integer, got 'often' (str)"),
    "unknown_key": ({"ogpsa_refresh": 3}, "ogpsa_refresh: unknown OGPSA key(s); known keys: " + KNOWN),
    "bad_choice": ({"ogpsa_granularity": "layer"},
                   "ogpsa_granularity: expected one of ['tensor', 'global'], got 'layer'"),
    "missing_reference": ({"ogpsa_reference": ""}, "ogpsa_reference: required for stage ogpsa_sft (comma-separated "
                          "dataset names from dataset_info.json, e.g. gsm8k_ref,alpaca_ref,hhh_ref)"),
}


def bad_config(tiny, out, case: str) -> dict:
    return base_config(tiny, out, max_steps=2, **{**ogpsa_keys(), **BAD[case][0]})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_are_one_line_naming_the_file(tiny, tmp_path, case):
    from ogpsa.plugin.preflight import preflight
    from ogpsa.plugin.settings import OGPSAConfigError

    with pytest.raises(OGPSAConfigError) as err:
        preflight(bad_config(tiny, tmp_path / "out", case), "config.yaml: ")
    assert str(err.value) == "config.yaml: " + BAD[case][1].format(data=tiny["data"])


def test_bad_settings_fail_before_training(tiny, tmp_path):
    """The contract in a real process: exit 2, the very line preflight raises (naming the file), nothing written."""
    out = tmp_path / "out"
    proc = run_cli(bad_config(tiny, out, "unknown_reference"), tmp_path / "run", check=False)
    message = BAD["unknown_reference"][1].format(data=tiny["data"])
    assert assert_refused(proc, message, out) == f"ogpsa: error: {tmp_path / 'run' / 'config.yaml'}: {message}"


def test_empty_reference_set_is_named(tiny, tmp_path):
    """Found when the callback tokenises the reference sets (after the model loads): the set and the
    dataset_dir named, in one line. (The contract of an error the run finds: the next test.)"""
    from helpers import tokenized_references

    from ogpsa.plugin.settings import OGPSAConfigError

    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "empty_ref": {"file_name": "empty_ref.json"}}))
    (data / "empty_ref.json").write_text("[]")
    with pytest.raises(OGPSAConfigError) as err:
        tokenized_references(tiny["model"], {**tiny, "data": str(data)}, ["toy_math_ref", "empty_ref"])
    message = str(err.value)
    assert message.startswith(f"ogpsa_reference: reference set 'empty_ref' is empty or cannot be loaded (dataset_dir "
                              f"{str(data)!r}): ") and "\n" not in message, message


def test_non_finite_reference_gradient_fails_before_training(tiny, tmp_path):
    """An error the run itself finds (the first build, after the trainer made output_dir): the same
    contract, output_dir removed again."""
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
    assert_refused(proc, "ogpsa_reference: the gradient of reference set 'toy_math_ref' is not finite at step 0 "
                         "(check the data and the learning rate)", out)
