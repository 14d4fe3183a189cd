"""`ogpsa_method: osf`: PEFT's orthogonal subspace fine-tuning as an `ogpsa_sft` / `ogpsa_dpo` stage.

Each stage trains through stock `llamafactory-cli train` on the tiny model; the tests read what it
saved. The invariant is checked against an SVD of the starting weights computed here, not PEFT's
buffers: for each wrapped weight W0 = U S V^T with its top k directions kept, the change dW of the
saved weight satisfies U_k^T dW = 0 and dW V_k = 0 (so U_k^T W V_k = S_k: the kept singular triples
are still singular triples of the trained weight), while dW itself is not 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN, assert_refused, base_config, load_state, log_history, max_diff, run_cli

from ogpsa.plugin.preflight import preflight
from ogpsa.plugin.settings import OGPSAConfigError

ROOT = Path(__file__).resolve().parents[1]
LINEARS = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
ADAMW = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_grad_norm": 0.0, "weight_decay": 0.01}
# What float32 leaves of an exact 0: the saved weight is U S V^T summed over two factor pairs and rounded
# once more when stored; measured here at 4-7 x eps x |W0|, where the gradient-only run (PEFT alone) drifts
# by 1e4 x eps x |W0| and more in 2 steps.
ROUNDING = 32


def osf_config(tiny, out, **overrides):
    return base_config(tiny, out, **{"stage": "ogpsa_sft", "ogpsa_method": "osf", **ADAMW, **overrides})


def top_drift(start: dict, end: dict, kept=lambda w: min(w.shape) // 2) -> dict[str, dict[str, float]]:
    """{weight: {dw: |dW|, left: |U_k^T dW|, right: |dW V_k|, eps: float32 eps x |W0|}} over the wrapped
    linears, with U_k, V_k the top k = kept(W0) singular vectors of the starting weight (Frobenius norms)."""
    out = {}
    for name in LINEARS:
        w0, w1 = start[name].double(), end[name].double()
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        k = kept(w0)
        dw = w1 - w0
        out[name] = {"dw": float(dw.norm()), "left": float((u[:, :k].T @ dw).norm()),
                     "right": float((dw @ vh[:k].T).norm()),
                     "eps": torch.finfo(torch.float32).eps * float(w0.norm())}
    return out


def assert_kept(drift: dict, moved: float = 1e-3) -> None:
    for name, d in drift.items():
        assert d["dw"] > moved, (name, d)  # the weight trained
        assert d["left"] < ROUNDING * d["eps"] and d["right"] < ROUNDING * d["eps"], (name, d)


@pytest.fixture(scope="module")
def osf_sft(tiny, tmp_path_factory):
    """4 AdamW steps of an OSF SFT stage, checkpoints at 2 and 4."""
    work = tmp_path_factory.mktemp("osf_sft")
    run_cli(osf_config(tiny, work / "out", max_steps=4, save_strategy="steps", save_steps=2), work)
    return work / "out"


def test_osf_stage_keeps_the_top_singular_directions(tiny, osf_sft):
    start, end = load_state(Path(tiny["model"])), load_state(osf_sft)
    assert set(end) == set(start)  # an ordinary checkpoint of the model, under its own names
    drift = top_drift(start, end)
    print({n.removeprefix("model.").removesuffix(".weight"): f"{d['left'] / d['dw']:.1e}" for n, d in drift.items()})
    assert_kept(drift)
    frozen = [k for k in start if k not in LINEARS]  # embeddings (tied head) and norms: frozen by OSF
    assert frozen and max_diff({k: start[k] for k in frozen}, end) == 0.0
    steps = [h for h in log_history(osf_sft) if "loss" in h]
    assert len(steps) == 4 and all(h["ogpsa/osf_step_removed"] > 0 for h in steps)  # Adam's step left the complement


@pytest.mark.long  # one more stage (~25 s): why the default ogpsa_target=update adds to PEFT, measured
def test_peft_gradient_hooks_alone_let_adam_move_the_top_directions(tiny, tmp_path):
    """ogpsa_target: gradient is PEFT's own behaviour: the gradient is orthogonal, Adam's step is not."""
    run_cli(osf_config(tiny, tmp_path / "out", max_steps=2, ogpsa_target="gradient"), tmp_path)
    drift = top_drift(load_state(Path(tiny["model"])), load_state(tmp_path / "out"))
    print({n.removeprefix("model.").removesuffix(".weight"): f"{d['left'] / d['dw']:.1e}" for n, d in drift.items()})
    assert all(d["left"] > 100 * ROUNDING * d["eps"] for d in drift.values())
    assert "ogpsa/osf_step_removed" not in log_history(tmp_path / "out")[0]


def test_rank_settings_reach_peft(tiny):
    """A count, a per-layer pattern that overrides it and the target list, through PEFT's wrap (in process)."""
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.osf import osf_layers, wrap_model

    settings, _ = preflight({"stage": "ogpsa_sft", "ogpsa_method": "osf", "finetuning_type": "full",
                             "dataset_dir": tiny["data"], "ogpsa_osf_effective_rank": 4,
                             "ogpsa_osf_rank_pattern": {r"mlp\.": 0.75}, "ogpsa_osf_target_modules": "q_proj,gate_proj"})
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), settings.osf)
    kept = {name.split(".", 2)[-1]: layer.effective_rank["default"] for name, layer in osf_layers(model).items()}
    assert kept == {f"model.layers.{i}.{n}": k for i in range(2)
                    for n, k in (("self_attn.q_proj", 4), ("mlp.gate_proj", 48))}  # gate: 0.75 x min(128, 64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".osf_svd_params." in n for n in trainable)  # everything else frozen, as in PEFT


@pytest.mark.long  # one more stage (~25 s) resumed from the fixture's checkpoint
def test_checkpoints_are_peft_adapters_and_resume(tiny, osf_sft, tmp_path):
    ckpt = osf_sft / "checkpoint-2"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "OSF" and adapter["effective_rank"] == 0.5
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(ckpt, out / "checkpoint-2")
    run_cli(osf_config(tiny, out, max_steps=4, save_strategy="steps", save_steps=2, overwrite_output_dir=False,
                       resume_from_checkpoint=str(out / "checkpoint-2")), tmp_path)
    assert max_diff(load_state(osf_sft), load_state(out)) < 1e-6


def test_osf_dpo_stage_starts_at_the_reference_model(tiny, tmp_path):
    """The DPO reference model is loaded plain (not wrapped), so the first step's rewards are 0."""
    cfg = osf_config(tiny, tmp_path / "out", stage="ogpsa_dpo", dataset="toy_safety_dpo", max_steps=2, pref_beta=0.1)
    run_cli(cfg, tmp_path)
    history = [h for h in log_history(tmp_path / "out") if "loss" in h]
    assert abs(history[0]["rewards/chosen"]) < 1e-4 and abs(history[0]["rewards/rejected"]) < 1e-4
    assert_kept(top_drift(load_state(Path(tiny["model"])), load_state(tmp_path / "out")), moved=0.0)


def test_the_saved_model_evaluates_and_joins_the_report(tiny, osf_sft, tmp_path, capsys):
    from ogpsa.pipelines import evaluate, report, scoring
    from ogpsa.pipelines.eval_config import EvalConfig

    model, _, _ = scoring.load_model(osf_sft, EvalConfig(dataset_dir=tiny["data"], template="qwen"))
    assert type(model).__name__ == "Qwen2ForCausalLM"  # a plain model, not a PEFT wrapper
    folder = tmp_path / "osf"
    args = [str(osf_sft), "--out", str(folder / "eval.json"), "--dataset-dir", tiny["data"], "--capability",
            "toy_math_eval", "--exclude", "toy_math_ref", "--harmful", "toy_harmful_eval", "--benign",
            "toy_benign_eval", "--max-new-tokens", "4", "--batch-size", "8", "--no-progress"]
    assert evaluate.main(args) == 0
    assert report.main([str(folder), "--out", str(tmp_path / "report")]) == 0
    assert "| osf |" in (tmp_path / "report.md").read_text()


def test_a_recipe_turns_into_its_osf_baseline(tiny):
    """`ogpsa_method=osf` on an OGPSA recipe: its reference and schedule keys do not reach the OSF stages."""
    from ogpsa.pipelines import recipe

    parsed = recipe.load(str(ROOT / "recipes" / "tiny_sft_dpo.yaml"),
                         ["ogpsa_method=osf", "ogpsa_osf_effective_rank=0.25", f"dataset_dir={tiny['data']}"])
    for stage in parsed.stages:
        ours = sorted(k for k in stage.args if k.startswith("ogpsa_"))
        assert ours == ["ogpsa_method", "ogpsa_osf_effective_rank"], ours
        settings, stock = preflight(stage.args)
        assert settings.osf.ogpsa_osf_effective_rank == 0.25 and stock["stage"] in ("sft", "dpo")


# ---- settings: one line naming the key, before anything loads ----------------------------------------------

BAD = {
    "reference key": ({"ogpsa_reference": "toy_math_ref"}, "ogpsa_reference: not used by ogpsa_method=osf"),
    "span key": ({"ogpsa_directions_per_set": 2}, "ogpsa_directions_per_set: not used by ogpsa_method=osf"),
    "osf key elsewhere": ({"ogpsa_method": "gradient_span", "ogpsa_reference": "toy_math_ref",
                           "ogpsa_osf_effective_rank": 4},
                          "ogpsa_osf_effective_rank: not used by ogpsa_method=gradient_span"),
    "unknown": ({"ogpsa_osf_rank": 4}, "ogpsa_osf_rank: unknown OSF key"),
    "zero": ({"ogpsa_osf_effective_rank": 0}, "ogpsa_osf_effective_rank: a count of kept directions must be >= 1"),
    "float one": ({"ogpsa_osf_effective_rank": 1.0}, "ogpsa_osf_effective_rank: 1.0 is ambiguous"),
    "fraction": ({"ogpsa_osf_effective_rank": 1.5}, "ogpsa_osf_effective_rank: a fraction must be in (0, 1)"),
    "text": ({"ogpsa_osf_effective_rank": "half"}, "ogpsa_osf_effective_rank: expected a count"),
    "bool": ({"ogpsa_osf_effective_rank": True}, "ogpsa_osf_effective_rank: expected a count"),
    "regex": ({"ogpsa_osf_rank_pattern": {"mlp(": 2}}, "ogpsa_osf_rank_pattern: 'mlp(' is not a regular expression"),
    "pattern rank": ({"ogpsa_osf_rank_pattern": {"mlp": 0}}, "ogpsa_osf_rank_pattern['mlp']: a count"),
    "pattern type": ({"ogpsa_osf_rank_pattern": [2]}, "ogpsa_osf_rank_pattern: expected a mapping"),
    "targets": ({"ogpsa_osf_target_modules": "q_proj,,v_proj"}, "ogpsa_osf_target_modules: expected"),
    "lora": ({"finetuning_type": "lora"}, "finetuning_type: ogpsa_method=osf wraps"),
    "freeze": ({"finetuning_type": "freeze"}, "finetuning_type: ogpsa_method=osf wraps"),
    "default lora": ({"finetuning_type": None}, "needs finetuning_type: full (got 'lora')"),
    "deepspeed": ({"deepspeed": "ds_z2.json"}, "deepspeed: ogpsa_method=osf runs on one process or DDP"),
    "fsdp": ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, "fsdp: ogpsa_method=osf runs on one process"),
    "quantised": ({"quantization_bit": 4}, "quantization_bit: not supported with ogpsa_method=osf"),
    "pure bf16": ({"pure_bf16": True}, "pure_bf16: bf16 weights cannot resolve a small step"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_are_one_line_naming_the_key(tiny, case):
    extra, message = BAD[case]
    args = {"stage": "ogpsa_sft", "ogpsa_method": "osf", "finetuning_type": "full", "dataset_dir": tiny["data"], **extra}
    with pytest.raises(OGPSAConfigError) as e:
        preflight({k: v for k, v in args.items() if v is not None}, "run.yaml: ")
    assert str(e.value).startswith("run.yaml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_good_settings_parse_to_peft_arguments(tiny):
    from ogpsa.plugin.osf_settings import osf_config_kwargs

    args = {"stage": "ogpsa_dpo", "ogpsa_method": "osf", "finetuning_type": "full", "dataset_dir": tiny["data"],
            "ogpsa_osf_effective_rank": "8", "ogpsa_osf_rank_pattern": '{"down_proj": 0.25}',  # command-line text
            "ogpsa_osf_target_modules": ["q_proj", "down_proj"], "ogpsa_target": "gradient"}
    settings, stock = preflight(args)
    assert stock["stage"] == "dpo" and not any(k.startswith("ogpsa_") for k in stock)
    assert settings.refresh_steps == 0 and settings.reference_names == []
    assert osf_config_kwargs(settings.osf) == {"effective_rank": 8, "target_modules": ["q_proj", "down_proj"],
                                               "rank_pattern": {"down_proj": 0.25}}


def test_refusal_through_the_cli_exits_2_before_anything_is_written(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(osf_config(tiny, out, finetuning_type="lora"), tmp_path, check=False)
    assert_refused(proc, "finetuning_type: ogpsa_method=osf wraps the model's linear layers itself", out)


@pytest.mark.multiprocess
def test_osf_under_ddp_keeps_the_top_directions(tiny, tmp_path):
    """2 CPU processes (gloo DDP) against 1 on the same global batch (all 8 samples every step, as
    test_distributed): each rank projects the same averaged step, so the saved weights keep the
    invariant and match the one-process run."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out_{nproc}"
        cfg = osf_config(tiny, out, max_samples=8, max_steps=2, per_device_train_batch_size=8 // nproc,
                         **({"ddp_backend": "gloo"} if nproc == 2 else {}))
        run_cli(cfg, tmp_path / f"run_{nproc}", env=TORCHRUN if nproc == 2 else None)
        runs[nproc] = load_state(out)
    start = load_state(Path(tiny["model"]))
    assert_kept(top_drift(start, runs[2]), moved=1e-4)
    assert max_diff(runs[1], runs[2]) < 1e-3 * max_diff(runs[1], start)


def test_guide_osf_table_is_generated_from_the_dataclass():
    """docs/guide.md's OSF settings table equals `osf_markdown()` (regenerate it from there)."""
    from ogpsa.plugin.osf_settings import osf_fields, osf_markdown

    text = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    begin, end = "<!-- osf-settings:begin -->", "<!-- osf-settings:end -->"
    block = text[text.index(begin) + len(begin):text.index(end)].strip("\n")
    assert block == osf_markdown() and len(block.splitlines()) == 2 + len(osf_fields())


# slow, not long: CI's 90 minutes are nearly spent, and the default suite already trains and evaluates an OSF
# SFT and DPO stage and reports them; this one adds the recipe path (pytest -m slow runs it)
@pytest.mark.slow  # a tiny SFT -> DPO pipeline with its evaluations (~1-2 min)
def test_osf_recipe_runs_sft_then_dpo_and_reports(tiny, tmp_path):
    """The tiny OGPSA recipe turned into its OSF baseline: DPO trains from SFT's merged model, both
    stages keep their own starting weights' top directions, and the run is a row of the report."""
    import os
    import subprocess

    from helpers import BIN, ENV

    assets = tmp_path / "runs" / "tiny_assets"
    shutil.copytree(Path(tiny["model"]).parent, assets)
    proc = subprocess.run([str(BIN / "llamafactory-cli"), "train", str(ROOT / "recipes" / "tiny_sft_dpo.yaml"),
                           "ogpsa_method=osf", "output_dir=runs/tiny_osf", "sft.num_train_epochs=1"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = tmp_path / "runs" / "tiny_osf"
    state = json.loads((root / "pipeline.json").read_text())
    sft, dpo = state["stages"]
    assert dpo["start_model"] == sft["model"] == str(root / "01_sft") and dpo["eval"]["metrics"]["nll/math"] > 0
    weights = [load_state(p) for p in (assets / "model", root / "01_sft", root / "02_dpo")]
    assert_kept(top_drift(weights[0], weights[1]))
    assert_kept(top_drift(weights[1], weights[2]), moved=0.0)  # DPO keeps the SFT model's directions
    from ogpsa.pipelines import report

    assert report.main([str(root), "--out", str(tmp_path / "report")]) == 0
    assert "| tiny_osf (tiny_sft_dpo) | dpo |" in (tmp_path / "report.md").read_text()


def test_command_line_flags_and_the_parsed_arguments_are_checked_too(tiny, tmp_path):
    """`--ogpsa_osf_*` flags arrive as text and are typed like the YAML's; the callback's `bind` refuses
    on LLaMA-Factory's parsed arguments what preflight refuses on a YAML (a flag-only run is checked there)."""
    from llamafactory.hparams import get_train_args

    from ogpsa.pipelines.integration.tuner import split_argv
    from ogpsa.plugin.osf import OSFCallback

    settings, stock = split_argv(["--stage", "ogpsa_dpo", "--ogpsa_method=osf", "--ogpsa_osf_effective_rank", "8",
                                  "--ogpsa_osf_rank_pattern", '{"mlp": 0.25}', "--finetuning_type", "lora"])
    assert stock == ["--stage", "dpo", "--finetuning_type", "lora"]
    assert settings.osf.ogpsa_osf_effective_rank == 8 and settings.osf.ogpsa_osf_rank_pattern == {"mlp": 0.25}
    cfg = base_config(tiny, tmp_path / "out", stage="sft", finetuning_type="lora")
    with pytest.raises(OGPSAConfigError, match=r"^finetuning_type: ogpsa_method=osf wraps"):
        OSFCallback(settings).bind(*get_train_args(cfg))
