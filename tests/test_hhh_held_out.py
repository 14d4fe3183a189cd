"""HHH accuracy is never measured on reference prompts: `ogpsa eval --hhh` applies `--exclude`, and
`ogpsa data refsets` keeps (and says how to keep) an HHH held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ogpsa.data_prep import tiny
from ogpsa.data_prep.cli import main as data_main
from ogpsa.pipelines import evaluate

# 6 distinct prompts in BIG-bench's layout; "Is water wet?" appears twice, as in the real task
EXAMPLES = [("Is water wet?", "Yes, water makes things wet.", "No.")] * 2 + [
    (f"Question number {i} about {topic}?", f"A careful answer about {topic}.", "Go away.")
    for i, topic in enumerate(["rivers", "bread", "music", "trees", "rain"])
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hhh")
    paths = tiny.build(root / "tiny")
    task = root / "hhh" / "harmless" / "task.json"
    task.parent.mkdir(parents=True)
    examples = [{"input": q, "target_scores": {good: 1, bad: 0}} for q, good, bad in EXAMPLES]
    task.write_text(json.dumps({"examples": examples}))
    return {**paths, "hhh": str(root / "hhh"), "root": root}


def _eval(assets, out: Path, *extra: str) -> int:
    return evaluate.main([assets["model"], "--hhh", assets["hhh"], "--out", str(out), "--no-progress", *extra])


def test_hhh_probe_drops_reference_prompts(assets, tmp_path, capsys):
    refs = tmp_path / "hhh_ref.json"  # two of the six prompts built the subspace; one is also upper-cased
    refs.write_text(json.dumps([{"instruction": "Is water wet?", "input": "", "output": "Yes."},
                                {"instruction": "QUESTION NUMBER 0 ABOUT RIVERS?", "input": "", "output": "x"}]))
    assert _eval(assets, tmp_path / "all.json") == 0
    assert _eval(assets, tmp_path / "held.json", "--exclude", str(refs)) == 0
    every, held = (json.loads((tmp_path / f).read_text())["hhh"] for f in ("all.json", "held.json"))
    assert (every["n"], every["n_excluded"]) == (7, 0)
    assert (held["n"], held["n_excluded"]) == (4, 3)  # the repeated prompt counts twice
    assert "hhh: 4 probes (3 dropped as reference prompts)" in capsys.readouterr().err
    # the same accuracy as a task file holding only the four held-out examples
    only = tmp_path / "only" / "harmless" / "task.json"
    only.parent.mkdir(parents=True)
    kept = [{"input": q, "target_scores": {g: 1, b: 0}} for q, g, b in EXAMPLES[3:]]
    only.write_text(json.dumps({"examples": kept}))
    args = [assets["model"], "--hhh", str(tmp_path / "only"), "--out", str(tmp_path / "only.json"), "--no-progress"]
    assert evaluate.main(args) == 0
    alone = json.loads((tmp_path / "only.json").read_text())["hhh"]
    assert (held["accuracy"], held["accuracy_norm"]) == (alone["accuracy"], alone["accuracy_norm"])


def test_hhh_with_every_prompt_excluded_exits_2(assets, tmp_path, capsys):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"instruction": q, "output": g} for q, g, _ in EXAMPLES]))
    out = tmp_path / "run" / "eval.json"
    assert _eval(assets, out, "--exclude", str(refs)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ogpsa eval: error: --hhh: all 7 HHH probes") and "--hhh-n" in err[-1]
    assert not out.parent.exists()


def test_refsets_keeps_an_hhh_split_that_eval_measures(assets, tmp_path, capsys):
    data = tmp_path / "data"
    base = ["refsets", "--out", str(data), "--gsm8k", "none", "--alpaca", "none", "--hhh", assets["hhh"]]
    assert data_main([*base, "--n", "5"]) == 0
    assert "hhh_ref takes 5 of the 6 distinct HHH prompts and leaves 1" in capsys.readouterr().err
    assert data_main([*base, "--n", "5", "--hhh-n", "3", "--eval-n", "3", "--overwrite"]) == 0
    assert "hhh_ref takes" not in capsys.readouterr().err
    ref, held = (json.loads((data / f"hhh_{s}.json").read_text()) for s in ("ref", "eval"))
    assert len(ref) == 3 and len(held) == 3
    assert not {r["instruction"] for r in ref} & {r["instruction"] for r in held}
    # the held-out split is an HHH probe of its own; against the reference set nothing is dropped
    out = tmp_path / "eval.json"
    args = [assets["model"], "--hhh", "hhh_eval", "--dataset-dir", str(data), "--exclude", "hhh_ref",
            "--out", str(out), "--no-progress"]
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())["hhh"]
    assert (result["n"], result["n_excluded"]) == (3, 0)
    # the whole BIG-bench task against the same reference set: only the held-out prompts are left
    assert _eval(assets, tmp_path / "bb.json", "--exclude", str(data / "hhh_ref.json")) == 0
    kept = json.loads((tmp_path / "bb.json").read_text())["hhh"]
    held_prompts = {r["instruction"] for r in held}
    assert kept["n"] == sum(q in held_prompts for q, *_ in EXAMPLES) and kept["n"] + kept["n_excluded"] == 7
