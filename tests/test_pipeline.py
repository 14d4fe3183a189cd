"""The SFT -> DPO pipeline runner: recipes, handoff, resume, validation."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ENV, load_state, max_diff, ogpsa_log

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run_recipe(tmp_path, *overrides, recipe=ROOT / "recipes" / "tiny_sft_dpo.yaml", cli="llamafactory-cli", check=True):
    proc = subprocess.run([str(BIN / cli), "train", str(recipe), *overrides], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **ENV}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def assets(tiny, tmp_path):
    """The tiny assets where the tiny recipe expects them (runs/tiny_assets under the cwd)."""
    target = tmp_path / "runs" / "tiny_assets"
    target.parent.mkdir(parents=True)
    shutil.copytree(Path(tiny["model"]).parent, target)
    return target


def state(tmp_path, name="tiny_sft_dpo"):
    return json.loads((tmp_path / "runs" / name / "pipeline.json").read_text())


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe, tmp_path):
    from ogpsa.pipelines import recipe as recipes

    raw = yaml.safe_load(recipe.read_text())
    assert recipe.read_text().startswith("#"), "recipes start with a header comment"
    assert "llamafactory-cli train recipes/" in recipe.read_text() and "###" in recipe.read_text()
    # a dataset_info.json with every dataset the recipe names, in the right format
    info = {}
    for stage in raw["stages"]:
        for name in str(stage.get("dataset", raw.get("dataset", ""))).split(","):
            info[name.strip()] = {"file_name": "x.json", "ranking": stage["stage"].endswith("dpo")}
    for name in str(raw.get("ogpsa_reference", "")).split(","):
        if name.strip():
            info[name.strip()] = {"file_name": "x.json"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    parsed = recipes.load(str(recipe), [f"dataset_dir={tmp_path}"])
    assert parsed.stages and all(s.stage in recipes.STAGE_TYPES for s in parsed.stages)
    assert parsed.stages[0].args["do_train"] is True


@pytest.fixture(scope="module")
def history(tiny, tmp_path_factory):
    """One tiny pipeline taken through what a user does to it, each command's outcome recorded for the
    tests below: the first run, the same command again, an interrupted DPO stage resumed, an edited DPO
    stage, an edited SFT stage, edited DPO data, a deleted SFT model folder (rerun with --verbose).
    {step: {"proc", "state", ...}} (the weights of the first run loaded)."""
    tmp = tmp_path_factory.mktemp("history")
    assets = tmp / "runs" / "tiny_assets"
    shutil.copytree(Path(tiny["model"]).parent, assets)
    root = tmp / "runs" / "tiny_sft_dpo"
    lr = "dpo.learning_rate=1.0e-6"  # stage 2 stays next to stage 1's weights
    done = {}
    first = run_recipe(tmp, lr)
    done["first"] = {"proc": first, "state": state(tmp), "root": root, "dpo_log": ogpsa_log(root / "02_dpo"),
                     "train_log": (root / "01_sft" / "train.log").read_text(),
                     "weights": [load_state(p) for p in (assets / "model", root / "01_sft", root / "02_dpo")],
                     "mtime": (root / "02_dpo" / "model.safetensors").stat().st_mtime_ns}
    again = run_recipe(tmp, lr)
    done["again"] = {"proc": again, "mtime": (root / "02_dpo" / "model.safetensors").stat().st_mtime_ns}
    # make the DPO stage look killed after its first checkpoint (step 4 of 8)
    st = state(tmp)
    st["stages"][1]["status"] = "running"
    (root / "pipeline.json").write_text(json.dumps(st))
    for name in ("model.safetensors", "train_results.json", "trainer_state.json", "all_results.json"):
        (root / "02_dpo" / name).unlink()
    shutil.rmtree(root / "02_dpo" / "checkpoint-8")
    resumed = run_recipe(tmp, lr)
    done["resumed"] = {"proc": resumed, "state": state(tmp), "train_log": (root / "02_dpo" / "train.log").read_text(),
                       "trainer_state": json.loads((root / "02_dpo" / "trainer_state.json").read_text())}
    done["edit_dpo"] = {"proc": run_recipe(tmp, lr, "dpo.pref_beta=0.2")}
    args = (lr, "dpo.pref_beta=0.2", "sft.num_train_epochs=1")
    done["edit_sft"] = {"proc": run_recipe(tmp, *args), "state": state(tmp)}
    mtime = {s: (root / s / "model.safetensors").stat().st_mtime_ns for s in ("01_sft", "02_dpo")}
    edit_json(assets / "data" / "toy_safety_dpo.json", lambda rows: rows[0].update(rejected="Sure, here is how."))
    done["edit_data"] = {"proc": run_recipe(tmp, *args), "before": mtime,
                         "after": {s: (root / s / "model.safetensors").stat().st_mtime_ns for s in ("01_sft", "02_dpo")}}
    before = (root / "02_dpo" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(root / "01_sft")
    done["deleted"] = {"proc": run_recipe(tmp, *args, "--verbose"), "state": state(tmp), "before": before,
                       "after": (root / "02_dpo" / "model.safetensors").stat().st_mtime_ns,
                       "files": {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}}
    return done


def test_tiny_pipeline_full_handoff(history):
    st, root = history["first"]["state"], history["first"]["root"]
    # quiet console: LLaMA-Factory's output is in each stage's train.log
    first = history["first"]["proc"]
    assert "Running training" not in first.stdout + first.stderr
    assert "***** Running training *****" in history["first"]["train_log"]
    sft, dpo = st["stages"]
    assert [sft["status"], dpo["status"]] == ["done", "done"]
    assert dpo["start_model"] == sft["model"] == str(root / "01_sft")
    assert sft["metrics"]["ogpsa"]["rebuilds"] == 6 and dpo["metrics"]["ogpsa"]["rebuilds"] == 4
    # the recipe's eval block: the starting model and each stage, recorded in pipeline.json
    for ev in (st["eval_base"], sft["eval"], dpo["eval"]):
        m = ev["metrics"]
        assert 0.0 <= m["refusal_harmful"] <= 1.0 and 0.0 <= m["refusal_benign"] <= 1.0
        assert all(m[f"nll/{k}"] > 0 for k in ("math", "general", "hhh"))
    assert sft["eval"]["metrics"]["nll/math"] != st["eval_base"]["metrics"]["nll/math"]
    # stage 2 trained from stage 1's weights: with a tiny DPO learning rate it stays next to them
    w0, w1, w2 = history["first"]["weights"]
    assert max_diff(w2, w1) < 1e-3 * max_diff(w1, w0)
    # the subspace was rebuilt at the DPO stage's first step, against that stage's start
    assert history["first"]["dpo_log"][0]["event"] == "rebuild" and history["first"]["dpo_log"][0]["step"] == 0


def test_the_same_command_again_skips_every_stage(history):
    again = history["again"]["proc"]
    assert again.stdout.count("unchanged and done, skipped") == 2
    assert history["again"]["mtime"] == history["first"]["mtime"]  # nothing retrained


def test_interrupted_stage_resumes_from_checkpoint(history):
    proc = history["resumed"]["proc"]
    assert "01_sft: unchanged and done, skipped" in proc.stdout and "(resuming)" in proc.stdout
    # the resumed run's LLaMA-Factory log is appended to the stage's log, after the first run's
    log = history["resumed"]["train_log"]
    assert log.count("\n=== ") == 2 and "Resuming training from" in log.split("\n=== ")[2]
    assert "Resuming training from" not in proc.stderr + proc.stdout
    trainer_state = history["resumed"]["trainer_state"]
    assert trainer_state["global_step"] == 8
    assert [h["step"] for h in trainer_state["log_history"] if "loss" in h][-4:] == [5, 6, 7, 8]
    dpo = history["resumed"]["state"]["stages"][1]
    assert dpo["status"] == "done" and dpo["resumed"] is True


def test_editing_a_stage_reruns_it_and_every_later_one(history):
    # editing the DPO stage reruns only it; editing SFT reruns both
    edit_dpo = history["edit_dpo"]["proc"]
    assert "01_sft: unchanged and done, skipped" in edit_dpo.stdout and "stage 02_dpo (ogpsa_dpo)" in edit_dpo.stdout
    edit_sft = history["edit_sft"]["proc"]
    assert "skipped" not in edit_sft.stdout
    assert history["edit_sft"]["state"]["stages"][0]["metrics"]["ogpsa"]["rebuilds"] == 3


def test_changed_data_reruns_only_the_stage_that_reads_it(history):
    proc, before, after = (history["edit_data"][k] for k in ("proc", "before", "after"))
    assert "01_sft: unchanged and done, skipped" in proc.stdout and "02_dpo: changed (data: toy_safety_dpo)" in proc.stdout
    assert after["01_sft"] == before["01_sft"] and after["02_dpo"] != before["02_dpo"]


def test_deleted_model_folder_retrains_it_and_the_next_stage_verbosely(history):
    proc = history["deleted"]["proc"]
    assert "01_sft: finished, but its model folder" in proc.stdout and "stage 02_dpo (ogpsa_dpo) from" in proc.stdout
    # --verbose: today's full output on the console, no log files
    assert (proc.stdout + proc.stderr).count("***** Running training *****") == 2
    files = history["deleted"]["files"]
    assert "01_sft/model.safetensors" in files and "02_dpo/model.safetensors" in files
    assert "01_sft/train.log" not in files and "02_dpo/train.log" not in files
    assert history["deleted"]["after"] != history["deleted"]["before"]
    assert [s["status"] for s in history["deleted"]["state"]["stages"]] == ["done", "done"]


def test_tiny_pipeline_lora_merges_between_stages(assets, tmp_path):
    run_recipe(tmp_path, "finetuning_type=lora", "lora_target=all", "learning_rate=1.0e-2", "output_dir=runs/lora",
               "dpo.learning_rate=1.0e-6", "sft.num_train_epochs=1", cli="ogpsa")
    st = state(tmp_path, "lora")
    root = tmp_path / "runs" / "lora"
    sft, dpo = st["stages"]
    assert sft["model"] == str(root / "01_sft" / "merged") == dpo["start_model"]
    assert dpo["model"] == str(root / "02_dpo" / "merged")
    w0, w1, w2 = (load_state(p) for p in (assets / "model", root / "01_sft/merged", root / "02_dpo/merged"))
    assert max_diff(w1, w0) > 1e-4  # the SFT adapter was merged into the weights
    assert max_diff(w2, w1) < 1e-2 * max_diff(w1, w0)


BAD = {
    "unknown_key": (["sft.learnin_rate=1"], "stage 'sft': learnin_rate: unknown LLaMA-Factory key"),
    "unknown_stage": (["dpo.stage=ppo"], "stage 'dpo': stage: unknown stage type 'ppo'"),
    "missing_dataset": (["sft.dataset=nope"], "stage 'sft': dataset: 'nope' not found in"),
    "missing_reference": (["ogpsa_reference=toy_math_ref,nope_ref"], "ogpsa_reference: 'nope_ref' not found"),
    "dpo_without_pairs": (["dpo.dataset=toy_safety_sft"], "stage 'dpo': dataset: 'toy_safety_sft' is not preference"),
    "sft_with_pairs": (["sft.dataset=toy_safety_dpo"], "stage 'sft': dataset: 'toy_safety_dpo' is not SFT data"),
    "bad_ogpsa_value": (["sft.ogpsa_refresh_steps=-1"], "stage 'sft': ogpsa_refresh_steps: must be >= 0"),
    "managed_key": (["sft.output_dir=elsewhere"], "stage 'sft': output_dir: set by the pipeline runner"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_rejected_before_training(assets, tmp_path, monkeypatch, case):
    overrides, message = BAD[case]
    from ogpsa.pipelines import recipe as recipes

    monkeypatch.chdir(tmp_path)
    with pytest.raises(recipes.OGPSAConfigError) as err:
        recipes.load(str(ROOT / "recipes" / "tiny_sft_dpo.yaml"), overrides)
    assert message in str(err.value)


def test_bad_recipe_cli_exit_code_and_nothing_written(assets, tmp_path):
    recipe = tmp_path / "dup.yaml"
    raw = yaml.safe_load((ROOT / "recipes" / "tiny_sft_dpo.yaml").read_text())
    raw["stages"][1]["name"] = "sft"
    recipe.write_text(yaml.safe_dump(raw))
    proc = run_recipe(tmp_path, recipe=recipe, check=False)
    assert proc.returncode == 2
    assert "stages[1].name: duplicate stage name 'sft'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny_sft_dpo").exists()


def test_quickstart_tiny_runs_plain_and_ogpsa_and_reports(tmp_path):
    proc = subprocess.run([str(BIN / "ogpsa"), "quickstart", "--tiny", "--out", str(tmp_path / "qs")], cwd=tmp_path,
                          capture_output=True, env={**os.environ, **ENV}, timeout=900)
    # bytes decoded by hand: text mode would turn a progress bar's carriage returns into line breaks
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, proc.stderr[-4000:]
    # quiet: a line per start and end and one bar per stage and evaluation; the full logs in files
    console = proc.stdout + proc.stderr
    assert console.count("\n") < 95, console  # 6 stages, 10 evaluations (3 averages), 3 run rows, the table
    assert "Running training" not in console and "input_ids" not in console
    # no third-party progress or loader lines (averaging, evaluation): they are in the logs
    for noise in ("Loading weights", "Writing model shards", "[ogpsa eval]", "Loading checkpoint"):
        assert noise not in console, noise
    assert "Writing model shards" in (tmp_path / "qs" / "plain" / "averages" / "average.log").read_text()
    # the compact table fits a terminal, names the full report, and every run's rows came as it finished
    table = proc.stdout[proc.stdout.rindex("run ") :]
    assert max(map(len, table.splitlines())) <= 100, table
    assert f"full table and notes: {tmp_path / 'qs' / 'report.md'}" in table
    assert re.search(r"^ogpsa +dpo +[0-9.]+ +[0-9.]+ .*\d+% \[-?\d+, -?\d+\]", table, re.M), table
    assert proc.stdout.count("\nogpsa ") == 4  # sft and dpo rows after the run, then in the final table
    # the starting model is evaluated once, by plain; the other runs reuse that evaluation
    assert f"log: {tmp_path / 'qs' / 'plain' / 'eval_base.log'}" in proc.stdout
    for run in ("ogpsa", "null_space"):
        assert not (tmp_path / "qs" / run / "eval_base.log").exists()
        assert f"{run} run: the starting model's evaluation is plain's" in proc.stdout
        base = json.loads((tmp_path / "qs" / run / "pipeline.json").read_text())["eval_base"]
        assert base == json.loads((tmp_path / "qs" / "plain" / "pipeline.json").read_text())["eval_base"]
    for run in ("plain", "ogpsa"):
        for stage, steps in (("01_sft", 24), ("02_dpo", 8)):
            log = tmp_path / "qs" / run / stage / "train.log"
            assert f"({'' if run == 'plain' else 'ogpsa_'}{stage[3:]}) from" in proc.stdout
            assert f"log: {log}" in proc.stdout and f"log: {log.parent / 'eval.log'}" in proc.stdout
            text = log.read_text()
            assert "***** Running training *****" in text and "input_ids:" in text and "train_loss" in text
            assert "[ogpsa eval] harmful: 8 probes" in (log.parent / "eval.log").read_text()
            assert re.search(rf"{stage}: 100%\|[^|]*\| {steps}/{steps} \[", proc.stderr)  # the bar's last state
    assert "input_ids:" not in (tmp_path / "qs" / "ogpsa" / "01_sft" / "eval.log").read_text()
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "plain" in report and "ogpsa" in report
    assert (tmp_path / "qs" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = json.loads((tmp_path / "qs" / "plain" / "pipeline.json").read_text())
    ogpsa = json.loads((tmp_path / "qs" / "ogpsa" / "pipeline.json").read_text())
    assert [s["stage"] for s in plain["stages"]] == ["sft", "dpo"]
    assert [s["stage"] for s in ogpsa["stages"]] == ["ogpsa_sft", "ogpsa_dpo"]
    assert "ogpsa" not in plain["stages"][0]["metrics"] and ogpsa["stages"][0]["metrics"]["ogpsa"]["rebuilds"] > 0
    # the weight-averaging curve of the plain run, and the tax avoided against plain
    for w in ("0.25", "0.5", "0.75"):
        assert f"| plain · average | {w}×dpo |" in report
        assert (tmp_path / "qs" / "plain" / "averages" / f"dpo_w{w}" / "eval.json").is_file()
    assert "tax avoided math" in report and "| Δ refusal | Δ over-refusal |" in report
    assert re.search(r"\| ogpsa \| dpo \|.*\| -?\d+% \[-?\d+, -?\d+\] \|", report), report
    # the null space at its defaults is part of the default run: built once per stage
    null = json.loads((tmp_path / "qs" / "null_space" / "pipeline.json").read_text())
    assert [s["metrics"]["ogpsa"]["rebuilds"] for s in null["stages"]] == [1, 1]
    assert re.search(r"\| null_space \| dpo \|.*\| -?\d+% \[-?\d+, -?\d+\] \|", report), report


@pytest.mark.long  # a third tiny pipeline (~20 s): kept out of the default suite's 15-minute budget
def test_quickstart_null_space_run_joins_the_report(tmp_path):
    """`--only null_space`: the same recipe with ogpsa_method=null_space, built once per stage, in the report."""
    out = tmp_path / "qs"
    proc = subprocess.run([str(BIN / "ogpsa"), "quickstart", "--tiny", "--only", "null_space", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "null_space" / "pipeline.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["ogpsa_sft", "ogpsa_dpo"]
    assert [s["metrics"]["ogpsa"]["rebuilds"] for s in run["stages"]] == [1, 1]  # once per stage, not every K
    events = [json.loads(line) for line in (out / "null_space" / "01_sft" / "ogpsa_log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "rebuild" and events[0]["method"] == "null_space"
    assert "| null_space | dpo |" in (out / "report.md").read_text()


# ---- reuse only what is still valid: data identity, missing results, one runner per folder ----------


@pytest.fixture
def fake_pipeline(assets, tmp_path, monkeypatch):
    """Runs the tiny recipe in this process with training and evaluation replaced by recorders:
    `run(*overrides)` returns (exit code, stage folders trained, models evaluated, stdout)."""
    from ogpsa.pipelines import runner

    monkeypatch.chdir(tmp_path)
    trained, evaluated = [], []

    def launch(argv, llamafactory=False, **console):
        out = Path(yaml.safe_load(Path(argv[1]).read_text())["output_dir"])
        trained.append(out.name)
        (out / "train_results.json").write_text('{"train_loss": 1.0}')
        return 0

    monkeypatch.setattr(runner, "_launch", launch)
    monkeypatch.setattr(runner.Pipeline, "_evaluate_model", lambda self, model, *log: evaluated.append(model) or {"metrics": {}})

    def run(*overrides):
        trained.clear(), evaluated.clear()
        code = runner.run_recipe(str(ROOT / "recipes" / "tiny_sft_dpo.yaml"), list(overrides))
        return code, list(trained), [Path(m).name for m in evaluated]

    run.launch = launch
    return run


def edit_json(path, change):
    rows = json.loads(path.read_text())
    change(rows)
    path.write_text(json.dumps(rows))


def test_stage_identity_covers_data_reference_sets_and_eval(fake_pipeline, assets, tmp_path, capsys):
    data = assets / "data"
    assert fake_pipeline() == (0, ["01_sft", "02_dpo"], ["model", "01_sft", "02_dpo"])
    assert fake_pipeline() == (0, [], [])
    capsys.readouterr()
    # the DPO data file: only the DPO stage reruns, and the log says why
    edit_json(data / "toy_safety_dpo.json", lambda rows: rows[0].update(chosen="No."))
    assert fake_pipeline() == (0, ["02_dpo"], ["02_dpo"])
    assert "stage 02_dpo: changed (data: toy_safety_dpo)" in capsys.readouterr().out
    # a dataset_info entry nothing uses changes nothing; the DPO stage's own entry reruns it
    edit_json(data / "dataset_info.json", lambda info: info["toy_dpo_chosen"].update(file_name="moved.json"))
    assert fake_pipeline() == (0, [], [])
    edit_json(data / "dataset_info.json", lambda info: info["toy_safety_dpo"].update(split="train"))
    assert fake_pipeline() == (0, ["02_dpo"], ["02_dpo"])
    # a reference set (also read by the eval block's `exclude`): both stages retrain, all three evaluations redo
    edit_json(data / "toy_hhh_ref.json", lambda rows: rows[0].update(output="changed"))
    assert fake_pipeline() == (0, ["01_sft", "02_dpo"], ["model", "01_sft", "02_dpo"])
    assert "stage 01_sft: changed (data: toy_hhh_ref)" in capsys.readouterr().out
    # the eval block, or a file only it reads: evaluations redone, nothing retrained
    assert fake_pipeline("eval.max_new_tokens=8") == (0, [], ["model", "01_sft", "02_dpo"])
    edit_json(data / "toy_harmful_eval.json", lambda rows: rows.pop())
    assert fake_pipeline("eval.max_new_tokens=8") == (0, [], ["model", "01_sft", "02_dpo"])
    assert fake_pipeline("eval.max_new_tokens=8") == (0, [], [])
    assert fake_pipeline("eval.max_new_tokens=8", "force=true") == (0, ["01_sft", "02_dpo"], ["01_sft", "02_dpo"])
    sft = state(tmp_path)["stages"][0]
    assert set(sft["inputs"]) == {"toy_safety_sft", "toy_math_ref", "toy_general_ref", "toy_hhh_ref"}


def test_missing_model_folder_retrains_the_stage_and_every_later_one(fake_pipeline, tmp_path, monkeypatch, capsys):
    from ogpsa.pipelines import runner

    root = tmp_path / "runs" / "tiny_sft_dpo"
    assert fake_pipeline("eval=null")[:2] == (0, ["01_sft", "02_dpo"])
    shutil.rmtree(root / "01_sft")
    on_disk = []  # what pipeline.json says about the DPO stage while the SFT stage retrains

    def launch(argv, llamafactory=False, **console):
        on_disk.append(state(tmp_path)["stages"][1]["status"])
        return fake_pipeline.launch(argv, llamafactory, **console)

    monkeypatch.setattr(runner, "_launch", launch)
    assert fake_pipeline("eval=null")[:2] == (0, ["01_sft", "02_dpo"])
    assert f"stage 01_sft: finished, but its model folder {root / '01_sft'} is gone" in capsys.readouterr().out
    # a run killed during the SFT retrain would find DPO's old result already forgotten
    assert on_disk == ["pending", "running"]
    assert fake_pipeline("eval=null")[:2] == (0, [])


def test_one_dataset_info_reader_for_recipes_identities_and_evaluation(tmp_path, monkeypatch):
    from ogpsa.pipelines import recipe as recipes
    from ogpsa.plugin.files import DatasetInfoError, dataset_names, read_dataset_info
    from ogpsa.plugin.settings import OGPSAConfigError
    from ogpsa.pipelines.probes import resolve_source

    assert read_dataset_info("ONLINE") is None and read_dataset_info("REMOTE:org/data") is None
    path = tmp_path / "dataset_info.json"
    with pytest.raises(DatasetInfoError, match=f"{path} does not exist") as missing:
        read_dataset_info(tmp_path)
    path.write_text("{")
    with pytest.raises(DatasetInfoError, match=f"{path} is not valid JSON") as invalid:
        read_dataset_info(str(tmp_path))
    assert missing.value.missing and not invalid.value.missing
    monkeypatch.chdir(tmp_path)
    # the recipe's first check that reads the file (its reference sets, through the one preflight) names it
    with pytest.raises(OGPSAConfigError, match=f"stage 'sft': .*{re.escape(str(path))} is not valid JSON"):
        recipes.load(str(ROOT / "recipes" / "tiny_sft_dpo.yaml"), [f"dataset_dir={tmp_path}"])
    with pytest.raises(ValueError, match=f"dataset_dir {tmp_path}: {path} is not valid JSON"):
        resolve_source("toy_harmful_eval", str(tmp_path))
    assert dataset_names("a, b,") == ["a", "b"] and dataset_names(["a", 1]) == ["a", "1"] and dataset_names(None) == []


def test_file_digests_stream_and_cover_folders(tmp_path):
    import hashlib

    from ogpsa.pipelines.identity import CHUNK, path_digest

    big = tmp_path / "d" / "big.jsonl"
    big.parent.mkdir()
    big.write_bytes(os.urandom(2 * CHUNK + 7))
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "a.json").write_text("[]")
    assert path_digest(str(big)) == hashlib.sha256(big.read_bytes()).hexdigest()
    before = path_digest(str(tmp_path / "d"))
    assert set(before) == {"big.jsonl", os.path.join("sub", "a.json")}
    (tmp_path / "d" / "sub" / "a.json").write_text("[1]")
    assert path_digest(str(tmp_path / "d")) != before
    assert path_digest(str(tmp_path / "nope")) == "missing"


def test_second_runner_refused_while_the_first_holds_the_folder(assets, tmp_path):
    import socket

    from ogpsa.pipelines.lock import PipelineLock

    root = tmp_path / "runs" / "tiny_sft_dpo"
    root.mkdir(parents=True)
    with PipelineLock(str(root)):
        proc = run_recipe(tmp_path, check=False)
        assert sorted(p.name for p in root.iterdir()) == ["pipeline.lock"]  # nothing else written
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ogpsa: error:")]
    assert len(errors) == 1 and str(root / "pipeline.lock") in errors[0]
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in errors[0]
    assert not (root / "pipeline.lock").exists()  # the holder removed its lock on leaving


def test_stale_lock_is_taken_over_and_a_foreign_one_refused(fake_pipeline, tmp_path, monkeypatch, capsys):
    import socket

    from ogpsa.pipelines import runner
    from ogpsa.pipelines.lock import PipelineLocked

    root = tmp_path / "runs" / "tiny_sft_dpo"
    root.mkdir(parents=True)
    lock = root / "pipeline.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    holders = []

    def launch(argv, llamafactory=False, **console):
        holders.append(json.loads(lock.read_text())["pid"])
        return fake_pipeline.launch(argv, llamafactory, **console)

    monkeypatch.setattr(runner, "_launch", launch)
    assert fake_pipeline("eval=null")[:2] == (0, ["01_sft", "02_dpo"])
    err = capsys.readouterr().err
    assert f"{lock}: taking over a stale lock (pid {dead.pid} on {socket.gethostname()} is not running)" in err
    assert holders == [os.getpid(), os.getpid()] and not lock.exists()
    # a lock from another host cannot be checked from here: refused, state untouched
    before = (root / "pipeline.json").read_bytes()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(PipelineLocked, match="in use by pid 1 on elsewhere since then .another host"):
        fake_pipeline("eval=null")
    assert (root / "pipeline.json").read_bytes() == before and lock.exists()


def test_failing_stage_shows_its_log_tail_and_exits_non_zero(assets, tmp_path, monkeypatch, capfd):
    """A stage that fails inside LLaMA-Factory: the console gets the tail of its log, names the file,
    and the runner returns the stage's exit code."""
    from ogpsa.pipelines import console, runner

    (tmp_path / "not_a_model").mkdir()
    monkeypatch.chdir(tmp_path)
    code = runner.run_recipe(str(ROOT / "recipes" / "tiny_sft_dpo.yaml"), ["eval=null", "model_name_or_path=not_a_model"])
    out, err = capfd.readouterr()
    log = tmp_path / "runs" / "tiny_sft_dpo" / "01_sft" / "train.log"
    assert code == 1 and state(tmp_path)["stages"][0]["status"] == "failed"
    assert f"ogpsa: stage 'sft' failed (exit 1); full log: {log}; rerun the same command to resume" in err
    lines = log.read_text().rstrip("\n").split("\n")
    assert len(lines) > console.TAIL_LINES + 20 and "Traceback" in log.read_text()
    assert f"--- last {console.TAIL_LINES} lines of {log} ---\n" + "\n".join(lines[-console.TAIL_LINES:]) in err
    assert lines[-console.TAIL_LINES - 1] not in out + err and "Traceback" not in out + err


def test_console_captures_everything_into_the_log_and_shows_the_tail_of_a_failure(tmp_path, capfd):
    """In-process work (evaluations, preparation): file descriptors 1 and 2 go to the log, whoever
    writes; an exception lands in the log, its tail on the terminal, and is raised again."""
    import logging

    from ogpsa.pipelines.console import Console, TqdmInLog, TrainerSteps

    log = tmp_path / "work.log"
    # made before, as library handlers are, on fd 2 (sys.stderr's own fd outside pytest's capture)
    handler = logging.StreamHandler(open(2, "w", closefd=False))
    with Console().captured(str(log), "work"):
        print("from print")
        os.write(2, b"from fd 2\n")
        handler.emit(logging.makeLogRecord({"msg": "from a logging handler"}))
    out, err = capfd.readouterr()
    assert out == err == ""  # (on a pipe an in-process bar leaves nothing: its caller's closing line follows)
    assert all(f"from {w}" in log.read_text() for w in ("print", "fd 2", "a logging handler"))
    with pytest.raises(RuntimeError, match="boom"):
        with Console().captured(str(log), "work"):
            print("\n".join(f"line {i}" for i in range(100)))
            raise RuntimeError("boom")
    out, err = capfd.readouterr()
    assert "RuntimeError: boom" in err and "line 99" in err and "line 40" not in err
    assert "line 40" in log.read_text() and "RuntimeError: boom" in log.read_text()
    with Console(verbose=True).captured(str(tmp_path / "none.log"), "work"):
        print("straight through")
    assert "straight through" in capfd.readouterr().out and not (tmp_path / "none.log").exists()
    # the bars' sources: LLaMA-Factory's trainer_log.jsonl, and tqdm lines in a log
    rows = [{"current_steps": 1, "total_steps": 8, "loss": 2.5}, {"current_steps": 8, "total_steps": 8}]
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"current_st')
    assert TrainerSteps(str(tmp_path)).poll() == (8, 8, "loss 2.5")
    (tmp_path / "bars.log").write_text("x\n\rharmful:  40%|####      | 4/10 [00:01<00:01]\rharmful:  50%|#####     | 5/10")
    assert TqdmInLog(str(tmp_path / "bars.log")).poll() == (5, 10, "harmful")
