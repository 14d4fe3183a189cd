"""`preflight`: one set of checks before training, run once per process for the same settings."""

from __future__ import annotations

import json
import os

import pytest

from ogpsa.plugin.preflight import preflight
from ogpsa.plugin.settings import OGPSAConfigError


def _registry(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    info = {n: {"file_name": f"{n}.json", "ranking": n.endswith("_dpo")} for n in names}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return str(folder)


def _args(dataset_dir, **extra):
    return {"stage": "ogpsa_sft", "dataset_dir": dataset_dir, "ogpsa_reference": "a_ref,b_ref",
            "ogpsa_refresh_steps": 3, **extra}


def test_the_same_settings_are_parsed_once(tmp_path):
    data = _registry(tmp_path / "data", ["a_ref", "b_ref"])
    first, stock = preflight(_args(data))
    again, stock_again = preflight(_args(data))
    assert again is first  # not parsed a second time
    assert stock == stock_again and stock["stage"] == "sft" and "ogpsa_refresh_steps" not in stock
    assert first.refresh_steps == 3 and first.reference_names == ["a_ref", "b_ref"]
    stock["dataset"] = "changed"  # each caller gets its own copy of the stock arguments
    assert "dataset" not in preflight(_args(data))[1]


def test_reference_errors_name_the_source(tmp_path):
    data = _registry(tmp_path / "data", ["a_ref", "b_dpo"])
    with pytest.raises(OGPSAConfigError, match=r"^run\.yaml: ogpsa_reference: 'b_ref' not found in .*dataset_info"):
        preflight(_args(data), "run.yaml: ")
    with pytest.raises(OGPSAConfigError, match=r"ogpsa_reference: 'b_dpo' in .* is a preference \(ranking\) dataset"):
        preflight(_args(data, ogpsa_reference="a_ref,b_dpo"))
    with pytest.raises(OGPSAConfigError, match=r"ogpsa_reference: .*dataset_info.json does not exist"):
        preflight(_args(str(tmp_path / "nowhere")))


def test_an_edited_registry_is_checked_again(tmp_path):
    data = _registry(tmp_path / "data", ["a_ref", "b_ref"])
    preflight(_args(data))
    _registry(tmp_path / "data", ["a_ref"])
    path = tmp_path / "data" / "dataset_info.json"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(OGPSAConfigError, match="'b_ref' not found"):
        preflight(_args(data))


def test_parsed_arguments_are_checked_by_the_same_function(tmp_path):
    """The callback's bind passes a getter over LLaMA-Factory's parsed arguments and its settings."""
    data = _registry(tmp_path / "data", ["a_ref", "b_ref"])
    settings, _ = preflight(_args(data))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    parsed = {"dataset_dir": data, "deepspeed": str(config), "pure_bf16": False}
    with pytest.raises(OGPSAConfigError, match="deepspeed: ZeRO stage 0 is not supported"):
        preflight(parsed.get, settings=settings)
    parsed["deepspeed"] = None
    assert preflight(parsed.get, settings=settings)[0] is settings


def test_stock_stages_pass_through(tmp_path):
    args = {"stage": "sft", "dataset_dir": str(tmp_path)}
    settings, stock = preflight(args)
    assert settings is None and stock == args
    with pytest.raises(OGPSAConfigError, match="ogpsa_refresh_steps: ogpsa_\\* keys need `stage: ogpsa_sft`"):
        preflight({**args, "ogpsa_refresh_steps": 3})
