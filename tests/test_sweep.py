"""`ogpsa sweep`: a recipe over a grid, validated before training, resumed, identical stages reused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ENV

from ogpsa.pipelines import sweep

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny_sft_dpo.yaml")


@pytest.fixture
def assets(tiny, tmp_path, monkeypatch):
    """The tiny assets where the tiny recipe expects them (runs/tiny_assets under the cwd)."""
    target = tmp_path / "runs" / "tiny_assets"
    target.parent.mkdir(parents=True)
    shutil.copytree(Path(tiny["model"]).parent, target)
    monkeypatch.chdir(tmp_path)
    return target


@pytest.mark.parametrize(
    "grid, says",
    [
        (["learning_rate=1e-3,fast"], "--grid learning_rate=fast: learning_rate='fast' is not a float"),
        (["ogpsa_method=gradient_span,nullspace"], "--grid ogpsa_method=nullspace:"),
        (["dpo.ogpsa_refresh_steps=2,-1"], "--grid dpo.ogpsa_refresh_steps=-1:"),
        (["num_train_epochs=1", "no_such_key=1,2"], "no_such_key: unknown LLaMA-Factory key"),
        (["output_dir=a,b"], "--grid output_dir: not a training setting"),
        (["learning_rate"], "--grid learning_rate: expected KEY=V1,V2"),
    ],
)
def test_bad_grid_value_refused_before_anything_runs(assets, tmp_path, capsys, grid, says):
    out = tmp_path / "sweep"
    args = [RECIPE, "--out", str(out)] + [x for g in grid for x in ("--grid", g)]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_a_method_and_its_settings_in_one_grid(assets, tmp_path, capsys):
    # null_alpha with the null-space method is a valid grid; beside the gradient span it is refused
    runs = sweep.plan(RECIPE, sweep.parse_grid(["ogpsa_method=null_space", "ogpsa_null_alpha=1e-5,5e-5"]), [], tmp_path / "s")
    assert [r.recipe.stages[1].args["ogpsa_null_alpha"] for r in runs[1:]] == [1e-5, 5e-5]
    args = [RECIPE, "--out", str(tmp_path / "s"), "--grid", "ogpsa_method=null_space,gradient_span",
            "--grid", "ogpsa_null_alpha=1e-4", "seed=7"]  # a plain override may follow the grid
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "--grid ogpsa_null_alpha=1e-4:" in err and "ogpsa_null_alpha: not used by ogpsa_method=gradient_span" in err
    assert err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_grid_key_reaches_every_stage_over_its_own_value(assets, tmp_path):
    runs = sweep.plan(RECIPE, sweep.parse_grid(["ogpsa_refresh_steps=7", "learning_rate=1e-3,2e-3"]), [], tmp_path / "s")
    assert [r.name for r in runs] == [
        "plain__learning_rate-1e-3", "plain__learning_rate-2e-3",
        "ogpsa_refresh_steps-7__learning_rate-1e-3", "ogpsa_refresh_steps-7__learning_rate-2e-3"]
    ogpsa = runs[3].recipe.stages
    assert [s.args["ogpsa_refresh_steps"] for s in ogpsa] == [7, 7]  # the recipe's stages say 4 and 2
    assert [s.args["learning_rate"] for s in ogpsa] == [2e-3, 2e-3]
    assert [s.stage for s in runs[0].recipe.stages] == ["sft", "dpo"] and "ogpsa_refresh_steps" not in runs[0].recipe.stages[0].args
    # the plain runs and the OGPSA runs differ in their first stage; equal learning rates share nothing else
    keys = [sweep.portable_keys(r.recipe) for r in runs]
    assert len({k[0] for k in keys}) == 4


@pytest.fixture
def fake_training(assets, monkeypatch):
    """Training and evaluation replaced by recorders (as in test_pipeline.fake_pipeline)."""
    from ogpsa.pipelines import runner

    trained, evaluated = [], []

    def launch(argv, llamafactory=False, **console):
        out = Path(yaml.safe_load(Path(argv[1]).read_text())["output_dir"])
        trained.append(f"{out.parent.name}/{out.name}")
        (out / "train_results.json").write_text('{"train_loss": 1.0}')
        return 0

    def evaluate(self, model, *log):
        evaluated.append(model)
        return {"metrics": {"refusal_harmful": 0.5, "refusal_benign": 0.1, "nll/math": 1.0, "nll_mean": 1.0}}

    monkeypatch.setattr(runner, "_launch", launch)
    monkeypatch.setattr(runner.Pipeline, "_evaluate_model", evaluate)
    return trained, evaluated


def test_identical_stages_trained_once_and_the_sweep_resumes(fake_training, tmp_path, capsys):
    trained, evaluated = fake_training
    out = tmp_path / "s"
    args = [RECIPE, "--out", str(out), "--grid", "dpo.pref_beta=0.1,0.2", "--average", "none"]
    assert sweep.main(args) == 0
    # a plain run per beta (pref_beta changes plain training too); beta 0.2's SFT stage is beta 0.1's
    # (same arguments and chain), for the plain runs and for the OGPSA runs
    assert trained == ["plain__dpo.pref_beta-0.1/01_sft", "plain__dpo.pref_beta-0.1/02_dpo", "plain__dpo.pref_beta-0.2/02_dpo",
                       "dpo.pref_beta-0.1/01_sft", "dpo.pref_beta-0.1/02_dpo", "dpo.pref_beta-0.2/02_dpo"]
    assert len(evaluated) == 1 + 2 + 1 + 2 + 1  # the starting model once, every stage trained once
    second = json.loads((out / "dpo.pref_beta-0.2" / "pipeline.json").read_text())
    assert second["stages"][0]["reused_from"] == str(out / "dpo.pref_beta-0.1" / "01_sft")
    assert second["stages"][1]["start_model"] == str(out / "dpo.pref_beta-0.1" / "01_sft")
    assert "dpo.pref_beta-0.2: reusing sft, eval_base of an earlier run" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| plain__dpo.pref_beta-0.1 | dpo |" in md and "tax avoided math" in md and "frontier" in md
    # rerun: nothing trains, nothing is evaluated
    trained.clear(), evaluated.clear()
    assert sweep.main(args) == 0 and trained == [] and evaluated == []
    # a new grid value joins: only its DPO stage trains
    assert sweep.main(args[:-4] + ["--grid", "dpo.pref_beta=0.1,0.2,0.3", "--average", "none"]) == 0
    assert trained == ["plain__dpo.pref_beta-0.3/02_dpo", "dpo.pref_beta-0.3/02_dpo"]
    # the shared SFT's model folder gone: its run retrains it, and the run that took it takes the new
    # one and retrains what it trained from the old one
    shutil.rmtree(out / "dpo.pref_beta-0.1" / "01_sft")
    trained.clear()
    assert sweep.main(args) == 0
    assert trained == ["dpo.pref_beta-0.1/01_sft", "dpo.pref_beta-0.1/02_dpo", "dpo.pref_beta-0.2/02_dpo"]


@pytest.mark.long  # three real tiny pipelines, five trained stages and nine evaluations (about 2 minutes on 2 cores)
def test_real_sweep_with_averaging_curve_and_frontier(assets, tmp_path):
    out = tmp_path / "s"
    proc = subprocess.run([str(BIN / "ogpsa"), "sweep", RECIPE, "--out", str(out), "--grid", "dpo.ogpsa_refresh_steps=1,2",
                           "--average", "0.5"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV},
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = ["plain", "dpo.ogpsa_refresh_steps-1", "dpo.ogpsa_refresh_steps-2"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(runs)
    assert not (out / runs[2] / "01_sft").exists()  # reused from the refresh-1 run
    state = json.loads((out / runs[2] / "pipeline.json").read_text())
    assert state["stages"][1]["metrics"]["ogpsa"]["rebuilds"] >= 1 and state["stages"][1]["eval"]["metrics"]
    assert (out / "plain" / "averages" / "dpo_w0.5" / "eval.json").is_file()
    md = (out / "report.md").read_text()
    assert "| plain · average | 0.5×dpo |" in md and "●" in md
    proc = subprocess.run([str(BIN / "ogpsa"), "sweep", RECIPE, "--out", str(out), "--grid", "dpo.ogpsa_refresh_steps=1,2",
                           "--average", "0.5"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV},
                          timeout=600)
    assert proc.returncode == 0 and "training it" not in proc.stdout and "evaluating" not in proc.stdout + proc.stderr


def test_each_run_against_its_own_plain_run_seeds_folded(fake_training, tmp_path, capsys, monkeypatch):
    """A grid over a non-ogpsa key: every OGPSA run here evaluates exactly as its own plain run, so each is
    reported at 0% (against the first plain run the second learning rate would read -100%)."""
    from ogpsa.pipelines import runner

    def evaluate(self, model, *log):
        nll = 2.0 if "learning_rate-2e-3" in model else 1.5 if "learning_rate-1e-3" in model else 1.0  # else: the start
        return {"metrics": {"refusal_harmful": 0.5, "refusal_benign": 0.1, "nll/math": nll, "nll_mean": nll}}

    monkeypatch.setattr(runner.Pipeline, "_evaluate_model", evaluate)
    out = tmp_path / "s"
    args = [RECIPE, "--out", str(out), "--grid", "learning_rate=1e-3,2e-3", "--seeds", "0,1", "--average", "none"]
    assert sweep.main(args) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        f"{kind}learning_rate-{lr}__seed-{s}" for kind in ("plain__", "") for lr in ("1e-3", "2e-3") for s in (0, 1))
    md = (out / "report.md").read_text()
    for lr in ("1e-3", "2e-3"):
        row = next(line for line in md.splitlines() if line.startswith(f"| learning_rate-{lr} | dpo |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "2" and cells[-4:-1] == ["0%", "+0.00", "+0.00"], row  # 2 seeds; tax avoided, Δs
        assert f"| plain__learning_rate-{lr} | dpo | 2 |" in md
    said = capsys.readouterr().out
    # every run's compact row as soon as it is evaluated, then the final table
    assert re.search(r"^learning_rate-2e-3__seed-1 +dpo +0\.500 +0\.100 +0% ", said, re.M), said
    assert max(map(len, said[said.rindex("\nrun ") + 1 :].splitlines())) <= 100
    # the seeds once only
    assert sweep.main(args + ["--grid", "seed=3"]) == 2
    assert "--seeds: the grid already has a seed key" in capsys.readouterr().err
