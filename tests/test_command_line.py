"""`llamafactory-cli train --key value ...` (no YAML): flags keep the types LLaMA-Factory gives them."""

import os
import subprocess

import pytest
from helpers import BIN, ENV, assert_refused, base_config, load_state, ogpsa_keys, ogpsa_log, run_cli


def _flags(cfg: dict) -> list[str]:
    """A config as `--key value` flags, every value as the text a user types."""
    out = []
    for key, value in cfg.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def _run_flags(argv: list[str], cwd) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(BIN / "llamafactory-cli"), "train", *argv], env={**os.environ, **ENV},
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_flags_train_exactly_as_the_yaml(tiny, tmp_path):
    common = dict(optim="sgd", max_steps=3, max_grad_norm=0.0)
    yaml_out, flag_out = tmp_path / "yaml", tmp_path / "flags"
    keys = ogpsa_keys(ogpsa_refresh_steps=2, ogpsa_reference_samples=8)
    run_cli(base_config(tiny, yaml_out, learning_rate=0.05, **common, **keys), tmp_path / "r1")
    # `5e-2` is a string to YAML 1.1 (no dot); it must reach TrainingArguments as the float 0.05.
    # One OGPSA flag in the `--key=value` form, the others as `--key value`.
    cfg = base_config(tiny, flag_out, **common, **keys)
    del cfg["ogpsa_reference_samples"], cfg["learning_rate"]
    argv = _flags(cfg) + ["--learning_rate", "5e-2", "--ogpsa_reference_samples=8"]
    proc = _run_flags(argv, tmp_path / "r2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {out: ogpsa_log(out) for out in (yaml_out, flag_out)}
    for log in logs.values():
        assert [r["step"] for r in log if r.get("event") == "rebuild"] == [0, 2]  # refresh arrived as the integer 2
    tokens = [{k: v for k, v in log[0].items() if k.startswith("tokens/")} for log in logs.values()]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3  # 8 samples per set in both forms
    a, b, start = load_state(yaml_out), load_state(flag_out), load_state(tiny["model"])
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # lr 0.05 moved the weights
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_bad_ogpsa_flag_is_one_line_exit_2(tiny, tmp_path):
    """Flags reach the OGPSA settings inside LLaMA-Factory's own launch (no YAML to check before it):
    the same contract as a YAML's bad setting, the message `split_argv` raises."""
    from ogpsa.pipelines.integration.tuner import split_argv
    from ogpsa.plugin.settings import OGPSAConfigError

    out = tmp_path / "out"
    argv = _flags(base_config(tiny, out, max_steps=1, **ogpsa_keys())) + ["--ogpsa_refresh_steps", "often"]
    with pytest.raises(OGPSAConfigError) as err:
        split_argv(argv)
    assert str(err.value) == "ogpsa_refresh_steps: expected an integer, got 'often' (str)"
    proc = _run_flags(argv, tmp_path / "r")
    assert assert_refused(proc, str(err.value), out) == f"ogpsa: error: {err.value}"


def test_stock_flags_reach_llamafactory_as_typed():
    from ogpsa.pipelines.integration.tuner import split_argv

    argv = ["--stage=ogpsa_sft", "--learning_rate", "1e-5", "--output_dir", "runs/x", "--do_train",
            "--ogpsa_reference", "a,b", "--ogpsa_refresh_steps=3", "--save_strategy", "no"]
    settings, stock = split_argv(argv)
    assert stock == ["--stage", "sft", "--learning_rate", "1e-5", "--output_dir", "runs/x", "--do_train",
                     "--save_strategy", "no"]
    assert settings.ogpsa_refresh_steps == 3 and settings.reference_names == ["a", "b"]
    plain = ["--stage", "sft", "--output_dir", "runs/ogpsa_baseline", "--learning_rate", "1e-5"]
    assert split_argv(plain) == (None, plain)  # a stock run is handed over untouched
