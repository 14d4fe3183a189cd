"""Engine checks before launch: what OGPSA refuses, with one line naming the key, exit 2, nothing written."""

import json

import pytest
from helpers import TORCHRUN, assert_refused, base_config, ogpsa_keys, run_cli

from ogpsa.plugin.engines import check_arguments
from ogpsa.plugin.settings import OGPSAArguments, OGPSAConfigError


def settings(**keys) -> OGPSAArguments:
    return OGPSAArguments(**{"ogpsa_reference": "a", **keys}, stage="ogpsa_sft")


def bf16_optimizer_config(tmp_path, enabled="auto", accum="fp32") -> str:
    """ZeRO-1 + bf16 + float32 gradient accumulation: DeepSpeed runs its BF16_Optimizer instead of ZeRO."""
    path = tmp_path / f"ds_bf16_{enabled}_{accum}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": enabled},
                                "data_types": {"grad_accum_dtype": accum}}))
    return str(path)


def ds(tmp_path, stage=2, **zero) -> str:
    path = tmp_path / f"ds_{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage, **zero}}))
    return str(path)


@pytest.mark.parametrize(
    "case,message",
    [
        ("zero0", "ZeRO stage 0"),
        ("offload_optimizer", "zero_optimization.offload_optimizer (device 'cpu')"),
        ("offload_param", "zero_optimization.offload_param (device 'nvme')"),
        ("global", "ogpsa_granularity: 'global' is not supported under DeepSpeed ZeRO"),
        ("missing", "does not exist"),
        ("fsdp1", "fsdp: OGPSA supports FSDP2 only"),
        ("pure_bf16", "pure_bf16: bf16 weights cannot resolve a small step"),
        ("use_mca", "use_mca: not supported"),
        ("use_galore", "use_galore: not supported"),
        ("bf16_optimizer", "ZeRO-1 with bf16 and data_types.grad_accum_dtype 'fp32' runs DeepSpeed's BF16_Optimizer"),
    ],
)
def test_unsupported_set_ups_are_refused(tmp_path, case, message):
    keys, args = {}, {}
    if case == "zero0":
        args["deepspeed"] = ds(tmp_path, 0)
    elif case == "offload_optimizer":
        args["deepspeed"] = ds(tmp_path, 3, offload_optimizer={"device": "cpu"})
    elif case == "offload_param":
        args["deepspeed"] = ds(tmp_path, 3, offload_param={"device": "nvme"})
    elif case == "global":
        args["deepspeed"], keys["ogpsa_granularity"] = ds(tmp_path, 2), "global"
    elif case == "missing":
        args["deepspeed"] = str(tmp_path / "nope.json")
    elif case == "bf16_optimizer":  # "auto" follows the run's bf16 flag, as the HF trainer fills it
        args["deepspeed"], args["bf16"] = bf16_optimizer_config(tmp_path), True
    elif case == "fsdp1":
        args.update(fsdp="full_shard auto_wrap", fsdp_config={"version": 1})
    else:
        args[case] = True
    with pytest.raises(OGPSAConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_arguments(args.get, settings(**keys), "x.yaml: ")


@pytest.mark.parametrize(
    "args,keys",
    [
        ({"deepspeed": "ZERO2"}, {}),
        ({"deepspeed": "ZERO3"}, {"ogpsa_mode": "conflict"}),
        ({"deepspeed": {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}}}}, {}),
        ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}, {"ogpsa_granularity": "global"}),
        ({"pure_bf16": True}, {"ogpsa_target": "gradient"}),
        ({}, {"ogpsa_granularity": "global"}),
    ],
)
def test_supported_set_ups_pass(tmp_path, args, keys):
    if isinstance(args.get("deepspeed"), str):
        args = {**args, "deepspeed": ds(tmp_path, int(args["deepspeed"][-1]))}
    check_arguments(args.get, settings(**keys), "")


@pytest.mark.parametrize("enabled,bf16,accum", [("auto", False, "fp32"), (True, False, "bf16"), (True, True, None)])
def test_zero1_bf16_without_fp32_accumulation_passes(tmp_path, enabled, bf16, accum):
    """Only bf16 weights with float32 accumulation make DeepSpeed pick its BF16_Optimizer."""
    path = tmp_path / "ds.json"
    config = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": enabled}}
    if accum:
        config["data_types"] = {"grad_accum_dtype": accum}
    path.write_text(json.dumps(config))
    check_arguments({"deepspeed": str(path), "bf16": bf16}.get, settings(), "")


def test_use_v1_is_refused(monkeypatch):
    monkeypatch.setenv("USE_V1", "1")
    with pytest.raises(OGPSAConfigError, match="USE_V1"):
        check_arguments({}.get, settings(), "")


def test_refused_before_launch_exit_2_nothing_written(tiny, tmp_path):
    """Under torchrun (2 processes asked for): refused before any rank starts, with the line the
    in-process checks above raise (the other refusals share this path and this contract)."""
    from ogpsa.plugin.preflight import preflight

    out = tmp_path / "out"
    cfg = base_config(tiny, out, deepspeed=ds(tmp_path, 3, offload_optimizer={"device": "cpu"}), **ogpsa_keys())
    with pytest.raises(OGPSAConfigError) as err:
        preflight(cfg, "config.yaml: ")
    message = str(err.value).removeprefix("config.yaml: ")
    assert message.startswith("deepspeed: zero_optimization.offload_optimizer (device 'cpu')")
    proc = run_cli(cfg, tmp_path / "run", env=TORCHRUN, check=False)
    assert assert_refused(proc, message, out) == f"ogpsa: error: {tmp_path / 'run' / 'config.yaml'}: {message}"
    # refused before launch: no process loaded the tokenizer or the model
    assert "distributed tasks" not in proc.stdout + proc.stderr and "trainable params" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["qwen_sft_dpo.yaml", "llama3_sft_dpo.yaml"])
def test_flagship_recipes_use_zero3_with_fp32_master_weights(name, tmp_path):
    """The paper's 7-8B full fine-tunes: ZeRO-3 with bf16 compute and fp32 master weights, the
    DeepSpeed config found next to the recipe from any working directory."""
    from pathlib import Path

    import yaml

    from ogpsa.pipelines import recipe as recipes

    path = Path(__file__).resolve().parents[1] / "recipes" / name
    raw = yaml.safe_load(path.read_text())
    info = {n: {"file_name": "x.json", "ranking": n.endswith("dpo")}
            for n in ["saferlhf_sft", "saferlhf_dpo", *raw["ogpsa_reference"].split(",")]}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    parsed = recipes.load(str(path), [f"dataset_dir={tmp_path}"])
    for stage in parsed.stages:
        assert stage.args["bf16"] is True and not stage.args.get("pure_bf16")
        config = json.loads(Path(stage.args["deepspeed"]).read_text())
        assert config["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in config["zero_optimization"]
        assert config["bf16"]["enabled"] == "auto"  # follows bf16: true; ZeRO keeps fp32 master weights
