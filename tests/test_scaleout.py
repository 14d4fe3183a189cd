"""OGPSA under DeepSpeed ZeRO-1/2/3: 2 processes (gloo, CPU) against the DDP OGPSA run.

Stock `llamafactory-cli train` with `FORCE_TORCHRUN=1 NPROC_PER_NODE=2` and a `deepspeed:` config.
Every run sees the same global batch: 8 samples, 2 per process and micro-batch, 2 accumulation
steps, gradient clipping active (max_grad_norm 1.0 against raw norms of about 1.5), plain SGD (an
equivalence check: Adam would amplify float32 reduction-order noise in near-zero coordinates).
The engine and DDP differ only in float32 reduction order, so the OGPSA weights must agree to
within 10x the plain runs' own engine-vs-DDP gap. Slow (about 20 s a run): `pytest -m multiprocess`.
"""

import json

import pytest
import torch
from helpers import (
    REFS,
    TORCHRUN,
    base_config,
    deepspeed_config,
    load_state,
    log_history,
    ogpsa_keys,
    ogpsa_log,
    reference_losses,
    run_cli,
)

pytestmark = pytest.mark.multiprocess

DATA = {"sft": "toy_safety_sft", "dpo": "toy_safety_dpo"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, str]:
    """{'ddp': None, 'zero1': path, ...}: DeepSpeed configs written once."""
    root = tmp_path_factory.mktemp("ds")
    out = {"ddp": None}
    for stage in (1, 2, 3):
        path = root / f"ds_z{stage}.json"
        path.write_text(json.dumps(deepspeed_config(stage)))
        out[f"zero{stage}"] = str(path)
    return out


def train(tiny, root, engines, engine, workflow, label, **keys):
    out = root / f"{workflow}_{engine}_{label}"
    if (out / "trainer_state.json").exists():  # module-level cache: the DDP baselines are shared
        return out
    cfg = base_config(tiny, out, **{
        "stage": workflow, "dataset": DATA[workflow], "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_samples": 8, "max_steps": 2, "optim": "sgd",
        "learning_rate": 0.05, "max_grad_norm": 1.0, "ddp_backend": "gloo", **keys})
    if engines[engine]:
        cfg["deepspeed"] = engines[engine]
    run_cli(cfg, root / f"run_{workflow}_{engine}_{label}", env=TORCHRUN)
    return out


def max_diff(a, b):
    keys = set(a) & set(b)  # ZeRO-1/2 also save the tied lm_head
    assert keys == set(b) or keys == set(a)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("scaleout")


def ogpsa(workflow, **extra):
    return ogpsa_keys(stage=f"ogpsa_{workflow}", **extra)


@pytest.mark.parametrize("workflow", ["sft", "dpo"])
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_matches_ddp(tiny, root, engines, engine, workflow):
    runs = {}
    for where in ("ddp", engine):
        runs[where, "plain"] = train(tiny, root, engines, where, workflow, "plain")
        runs[where, "ogpsa"] = train(tiny, root, engines, where, workflow, "ogpsa", **ogpsa(workflow))
    runs[engine, "observe"] = train(tiny, root, engines, engine, workflow, "observe",
                                    **ogpsa(workflow, ogpsa_mode="observe"))
    w = {k: load_state(v) for k, v in runs.items()}

    update = max_diff(w["ddp", "plain"], load_state(tiny["model"]))
    plain_gap = max_diff(w["ddp", "plain"], w[engine, "plain"])
    gap = max_diff(w["ddp", "ogpsa"], w[engine, "ogpsa"])
    effect = max_diff(w["ddp", "ogpsa"], w["ddp", "plain"])
    ulp = torch.finfo(torch.float32).eps * max(float(v.abs().max()) for v in w["ddp", "ogpsa"].values())
    tolerance = max(10 * plain_gap, 8 * ulp)
    print(f"{engine} {workflow}: update {update:.2e}, plain ddp-vs-engine {plain_gap:.2e}, "
          f"ogpsa ddp-vs-engine {gap:.2e} (tolerance {tolerance:.2e}), ogpsa-plain {effect:.2e}")
    assert gap <= tolerance
    assert effect > 1000 * tolerance  # the projection itself is far above that noise
    # observe mode measures and changes nothing, also inside the engine's step
    assert max_diff(w[engine, "plain"], w[engine, "observe"]) == 0.0

    ddp_rebuild = [r for r in ogpsa_log(runs["ddp", "ogpsa"]) if r.get("event") == "rebuild"]
    rebuilds = [r for r in ogpsa_log(runs[engine, "ogpsa"]) if r.get("event") == "rebuild"]
    assert len(rebuilds) == 2 and all(r["engine"] == engine and r["rank_spread"] == 0.0 for r in rebuilds)
    first = rebuilds[0]
    # the basis is sharded: this rank stores its pieces only, and the pieces add up to the whole
    assert first["basis_bytes_total"] == ddp_rebuild[0]["basis_bytes"]
    assert abs(first["basis_bytes"] - first["basis_bytes_total"] / 2) <= 0.02 * first["basis_bytes_total"]
    for name in REFS:  # the same reference gradients, reduced over ranks
        assert first[f"grad_norm/{name}"] == pytest.approx(ddp_rebuild[0][f"grad_norm/{name}"], rel=1e-5)
    steps = [r for r in ogpsa_log(runs[engine, "ogpsa"]) if "removed_fraction" in r]
    assert len(steps) == 2 and all(abs(r[f"cos_after/{n}"]) < 1e-5 for r in steps for n in REFS)
    # clip -> project: the engine clipped the raw norm (> 1) to 1 before the projection saw it
    raw = [h["grad_norm"] for h in log_history(runs[engine, "ogpsa"]) if "loss" in h]
    assert all(g > 1.0 for g in raw) and all(abs(r["grad_norm"] - 1.0) < 1e-4 for r in steps)

    # first order: the reference losses move >= 10x less than under the same engine's plain run
    start = reference_losses(tiny["model"], tiny, REFS)
    moved = {}
    for label in ("plain", "ogpsa"):
        after = reference_losses(str(runs[engine, label]), tiny, REFS)
        moved[label] = max(abs(after[n] - start[n]) for n in REFS)
    print(f"{engine} {workflow}: largest reference-loss change, plain {moved['plain']:.5f}, ogpsa {moved['ogpsa']:.5f}")
    assert moved["plain"] > 0.005 and moved["ogpsa"] * 10 <= moved["plain"]


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_keeps_reference_losses_steady(tiny, root, engines, engine):
    """AdamW, both targets, the same engine: the default update target holds the reference losses
    >= 10x steadier than plain training, while the safety loss still falls."""
    names = REFS + ["toy_safety_sft"]
    start = reference_losses(tiny["model"], tiny, names)
    adam = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 3}
    change = {}
    for label, keys in (("plain", {}), ("update", ogpsa("sft"))):
        out = train(tiny, root, engines, engine, "sft", f"adam_{label}", **adam, **keys)
        after = reference_losses(str(out), tiny, names)
        change[label] = {n: after[n] - start[n] for n in names}
    worst = {k: max(abs(v[n]) for n in REFS) for k, v in change.items()}
    print(f"{engine}: largest reference-loss change, plain {worst['plain']:.5f}, ogpsa {worst['update']:.5f}")
    assert worst["plain"] > 0.05
    assert worst["update"] * 10 <= worst["plain"]
    assert change["update"]["toy_safety_sft"] < -0.1


MATRIX = [(engine, tuning, workflow) for engine in ("zero1", "zero2", "zero3") for tuning in ("lora", "freeze")
          for workflow in ("sft", "dpo")] + [("zero1", "full", "sft"), ("zero1", "full", "dpo")]
TUNING = {"full": {}, "freeze": {"finetuning_type": "freeze"},
          "lora": {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 4, "learning_rate": 0.5}}


@pytest.mark.parametrize("engine,tuning,workflow", MATRIX)
def test_support_matrix_cell_matches_ddp(tiny, root, engines, engine, tuning, workflow):
    """Every engine x fine-tuning x workflow cell of the README's support matrix against its DDP run."""
    extra = {**TUNING[tuning], **ogpsa(workflow)}
    ddp_out = train(tiny, root, engines, "ddp", workflow, f"{tuning}_ogpsa", **extra)
    out = train(tiny, root, engines, engine, workflow, f"{tuning}_ogpsa", **extra)
    ddp, got = load_adapter_or_model(ddp_out), load_adapter_or_model(out)
    if tuning == "lora":  # B starts at zero: its size is the update
        update = max(float(v.abs().max()) for k, v in ddp.items() if "lora_B" in k)
    else:
        update = max_diff(ddp, load_state(tiny["model"]))
    gap = max_diff(ddp, got)
    print(f"{engine} {tuning} {workflow}: ddp-vs-engine {gap:.2e}, update {update:.2e}")
    assert update > 1e-3 and gap <= 1e-4 * update
    ddp_event = next(r for r in ogpsa_log(ddp_out) if r.get("event") == "rebuild")
    event = next(r for r in ogpsa_log(out) if r.get("event") == "rebuild")
    assert event["engine"] == engine and event["rank"] == ddp_event["rank"] == 3
    assert event["basis_bytes_total"] == ddp_event["basis_bytes"] and event["param_numel"] == ddp_event["param_numel"]


@pytest.mark.parametrize("engine,workflow,mode,target", [("zero2", "sft", "conflict", "gradient"),
                                                         ("zero3", "dpo", "conflict", "update")])
def test_modes_and_targets_match_ddp(tiny, root, engines, engine, workflow, mode, target):
    """`conflict` gating (needs the reduced <g, r_j>) and the `gradient` target inside the engine."""
    extra = ogpsa(workflow, ogpsa_mode=mode, ogpsa_target=target)
    label = f"{mode}_{target}"
    ddp = load_state(train(tiny, root, engines, "ddp", workflow, label, **extra))
    got = load_state(train(tiny, root, engines, engine, workflow, label, **extra))
    update = max_diff(ddp, load_state(tiny["model"]))
    gap = max_diff(ddp, got)
    steps = [r for r in ogpsa_log(root / f"{workflow}_{engine}_{label}") if "projected_blocks" in r]
    print(f"{engine} {workflow} {mode}/{target}: ddp-vs-engine {gap:.2e}, update {update:.2e}, "
          f"projected blocks {[r['projected_blocks'] for r in steps]}")
    assert update > 1e-3 and gap <= 1e-4 * update
    assert all(0 < r["projected_blocks"] for r in steps)  # conflict mode gated some blocks in
    assert ("update_in_span_norm" in steps[0]) == (target == "update")


def test_accelerate_env_deepspeed_is_detected(tiny, root, engines):
    """DeepSpeed enabled by the environment (as `accelerate launch` with a config file does), no
    `deepspeed:` key: the engine actually running is found and projected, as the YAML form."""
    out = root / "env_zero2"
    cfg = base_config(tiny, out, **{
        "stage": "sft", "dataset": DATA["sft"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_samples": 8, "max_steps": 2, "optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 1.0,
        "ddp_backend": "gloo", **ogpsa("sft")})
    env = {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    run_cli(cfg, root / "run_env_zero2", env=env)
    events = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    assert events and all(r["engine"] == "zero2" for r in events)
    reference = train(tiny, root, engines, "zero2", "sft", "ogpsa", **ogpsa("sft"))
    assert max_diff(load_state(reference), load_state(out)) <= 1e-6


def load_adapter_or_model(out):
    from safetensors.torch import load_file

    adapter = out / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.exists() else load_state(out)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_resume_under_zero_equals_uninterrupted_run(tiny, tmp_path, engines, engine):
    """Under ZeRO each rank saves and restores its own piece of the basis with the DeepSpeed
    checkpoint; under DDP rank 0 saves the one replicated basis and every rank reads it."""
    import shutil

    cfg = base_config(tiny, None, **{
        "stage": "ogpsa_sft", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_samples": 16, "max_steps": 4, "optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 1.0,
        "ddp_backend": "gloo", "deepspeed": engines[engine], "save_strategy": "steps", "save_steps": 2,
        "overwrite_output_dir": False, **ogpsa_keys(ogpsa_refresh_steps=3)})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out in (whole, resumed):
        run_cli({**cfg, "output_dir": str(out)}, tmp_path / f"run_{out.name}", env=TORCHRUN)
    pieces = sorted(p.name for p in (whole / "checkpoint-2" / "ogpsa").iterdir())
    sizes = [[b - a for a, b in torch.load(whole / "checkpoint-2" / "ogpsa" / p, weights_only=True)["pieces"]]
             for p in pieces]
    total = sum(t.numel() for t in load_state(whole).values())
    if engine == "ddp":
        assert pieces == ["replicated.pt"] and sum(sizes[0]) == total
    else:
        assert pieces == ["rank0-of-2.pt", "rank1-of-2.pt"]
        assert all(0 < sum(s) < total for s in sizes)  # a piece each, not the whole basis
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "model.safetensors").unlink()
    proc = run_cli({**cfg, "output_dir": str(resumed), "resume_from_checkpoint": str(resumed / "checkpoint-2")},
                   tmp_path / "run_resume", env=TORCHRUN)
    assert "resumed the subspace built at step 0" in proc.stderr + proc.stdout
    gap = max_diff(load_state(whole), load_state(resumed))
    print(f"{engine}: resumed vs uninterrupted {gap:.2e}")
    assert gap < 1e-6
    assert [r["step"] for r in ogpsa_log(resumed) if r.get("event") == "rebuild"] == [0, 3]
