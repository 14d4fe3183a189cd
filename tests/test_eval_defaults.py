"""`ogpsa eval RUN` with no measure given: the run's own held-out sets and reference exclusions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ogpsa.pipelines import evaluate

REFS = ["toy_math_ref", "toy_general_ref", "toy_hhh_ref"]
HHH_EVAL = [  # the shape `ogpsa data refsets --eval-n` writes
    {"instruction": f"Is {topic} good?", "input": "", "output": "Yes, mostly.", "choices": ["Yes, mostly.", "No."],
     "label": 0} for topic in ("rain", "bread", "music")
]


@pytest.fixture
def run(tiny, tmp_path):
    """A pipeline folder as the runner leaves it: pipeline.json and a stage folder with its
    stage_config.yaml (dataset_dir relative to the current folder) and model; LoRA-style `merged/`."""
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    math_eval = json.loads((data / "toy_math_eval.json").read_text())
    leaked = json.loads((data / "toy_math_ref.json").read_text())[:2]  # two reference rows among the probes
    (data / "toy_math_eval.json").write_text(json.dumps(math_eval + leaked))
    (data / "hhh_eval.json").write_text(json.dumps(HHH_EVAL))
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "hhh_eval": {"file_name": "hhh_eval.json"}}))
    root = tmp_path / "runs" / "ogpsa"
    stage = root / "01_sft"
    shutil.copytree(tiny["model"], stage)
    shutil.copytree(tiny["model"], stage / "merged")  # its stage_config.yaml is the stage folder's
    args = {"stage": "ogpsa_sft", "dataset_dir": "data", "template": "qwen", "ogpsa_reference": ",".join(REFS[:2])}
    (stage / "stage_config.yaml").write_text(yaml.safe_dump(args))
    stages = [{"name": "sft", "stage": "ogpsa_sft", "output": str(stage), "status": "done"}]
    (root / "pipeline.json").write_text(json.dumps({"recipe": "r.yaml", "stages": stages}))
    return root


def _result(out: Path, folder: str) -> dict:
    result = json.loads(out.read_text())
    return result["stages"][0]["eval"] if folder == "pipeline" else result


@pytest.mark.parametrize("folder", ["pipeline", "stage", "merged"])
def test_defaults_come_from_the_run(run, tmp_path, monkeypatch, capsys, folder):
    monkeypatch.chdir(tmp_path)  # the run's dataset_dir is relative, as in a recipe
    target = {"pipeline": run, "stage": run / "01_sft", "merged": run / "01_sft" / "merged"}[folder]
    out = tmp_path / "eval.json"
    assert evaluate.main([str(target), "--out", str(out), "--max-new-tokens", "4", "--no-progress"]) == 0
    assert "defaults from the run" in capsys.readouterr().err
    got = _result(out, folder)
    assert sorted(got["capability"]) == ["hhh_eval", "toy_general_eval", "toy_hhh_eval", "toy_math_eval"]
    assert got["capability"]["toy_math_eval"]["n_excluded"] == 2  # the leaked reference rows
    assert got["capability"]["toy_math_eval"]["n_probes"] == 16
    assert got["safety"]["source"] == "toy_harmful_eval" and got["over_refusal"]["source"] == "toy_benign_eval"
    assert got["hhh"]["n"] == 3 and got["hhh"]["source"] == "hhh_eval"
    assert set(got["settings"]["exclude"]) == set(REFS) and got["settings"]["dataset_dir"] == "data"
    # the same numbers as the explicit command
    explicit = tmp_path / "explicit.json"
    args = [str(run / "01_sft"), "--out", str(explicit), "--dataset-dir", "data", "--exclude", *REFS,
            "--capability", "hhh_eval", "toy_general_eval", "toy_hhh_eval", "toy_math_eval", "--harmful",
            "toy_harmful_eval", "--benign", "toy_benign_eval", "--hhh", "hhh_eval", "--max-new-tokens", "4",
            "--no-progress"]
    assert evaluate.main(args) == 0
    assert json.loads(explicit.read_text())["metrics"] == got["metrics"]


def test_given_measures_keep_the_run_exclusions(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert evaluate.main([str(run / "01_sft"), "--capability", "toy_math_eval", "--out", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())
    assert list(got["capability"]) == ["toy_math_eval"] and got["capability"]["toy_math_eval"]["n_excluded"] == 2
    assert got["safety"] is None and got["hhh"] is None


def test_nothing_to_evaluate_is_a_clear_error(run, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert evaluate.main([tiny["model"], "--out", str(tmp_path / "a.json")]) == 2  # not written by the runner
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ogpsa eval: error: nothing to evaluate: give --capability") and "stage_config.yaml" in err[-1]
    monkeypatch.chdir(run)  # the relative dataset_dir is not there from here
    assert evaluate.main([str(run), "--out", str(tmp_path / "b.json")]) == 2
    assert "dataset_dir 'data'" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
