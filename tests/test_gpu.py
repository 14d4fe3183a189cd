"""The GPU acceptance checks (`pytest -m gpu`; `benchmarks/gpu_session.sh` runs them part by part).

On a CUDA machine every test runs there, in bf16 mixed precision. Elsewhere they are skipped, unless
`GPU_REHEARSAL=cpu` is set: then the same runs go through on CPU in float32 (the session script's
rehearsal), and what only CUDA can show (the CUDA kernels, host/device copies, FSDP, which accelerate
enables on accelerators only) is skipped with the reason "skipped: no CUDA".

With `GPU_RECORD=FILE`, each check appends one JSON line of what it measured (the session script
turns them into checks.json for the README's support matrix).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (ALPHA, MLP, REFS, base_config, load_state, log_history, null_energy, null_keys, ogpsa_keys,
                     ogpsa_log, reference_inputs, reference_losses, run_cli)

from ogpsa.plugin.methods.gradient_span.maths import build_basis, project_, residual_cosines

CUDA = torch.cuda.is_available()
REHEARSAL = os.environ.get("GPU_REHEARSAL") == "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="skipped: no CUDA")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (CUDA or REHEARSAL), reason="needs CUDA (or GPU_REHEARSAL=cpu for the rehearsal)")]

DATA = {"sft": "toy_safety_sft", "dpo": "toy_safety_dpo"}
TARGET = {"sft": "toy_safety_sft", "dpo": "toy_dpo_chosen"}  # the loss the stage must still lower
Z3_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "ds_z3_config.json"
# bf16 mixed precision on CUDA (LLaMA-Factory keeps the trainable weights in float32 and ZeRO-3 keeps
# float32 master partitions); the CPU rehearsal runs float32
PRECISION = {"bf16": True} if CUDA else {}
ONE_RANK = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}  # the engines need a process group
SHAPES = [(896, 896), (4864, 896), (896,), (151936 // 16, 896)]


def record(check: str, **values) -> None:
    """Print what a check measured and append it to $GPU_RECORD (one JSON object a line)."""
    entry = {"check": check, "device": torch.cuda.get_device_name() if CUDA else "cpu (rehearsal)",
             "precision": "bf16 mixed" if CUDA else "fp32", **values}
    print(json.dumps(entry))
    path = os.environ.get("GPU_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def stage_config(tiny, out, workflow: str, ogpsa: bool, **overrides) -> dict:
    keys = ogpsa_keys(stage=f"ogpsa_{workflow}") if ogpsa else {"stage": workflow}
    cfg = base_config(tiny, out, dataset=DATA[workflow], **PRECISION, **keys, **overrides)
    if workflow == "dpo":
        cfg["pref_beta"] = 0.1
    return cfg


def first_order(tiny, tmp_path, workflow: str, label: str, env=None, **overrides) -> dict:
    """Plain and OGPSA runs of one set-up; the largest reference-loss change of each, the target loss's
    change under OGPSA, and the OGPSA run's rebuild and step records."""
    names = REFS + [TARGET[workflow]]
    start = reference_losses(tiny["model"], tiny, names)
    change, outs = {}, {}
    for kind in ("plain", "ogpsa"):
        out = outs[kind] = tmp_path / kind
        run_cli(stage_config(tiny, out, workflow, kind == "ogpsa", **overrides), tmp_path / f"run_{kind}", env=env)
        after = reference_losses(str(out), tiny, names)
        change[kind] = {n: after[n] - start[n] for n in names}
    log = ogpsa_log(outs["ogpsa"])
    result = {
        "moved_plain": max(abs(change["plain"][n]) for n in REFS),
        "moved_ogpsa": max(abs(change["ogpsa"][n]) for n in REFS),
        "target_change_ogpsa": change["ogpsa"][TARGET[workflow]],
        "rebuilds": [r for r in log if r.get("event") == "rebuild"],
        "steps": [r for r in log if "removed_fraction" in r],
        "history": [h for h in log_history(outs["ogpsa"]) if "loss" in h],
    }
    first = result["rebuilds"][0] if result["rebuilds"] else {}
    record(label, workflow=workflow, engine=first.get("engine"), moved_plain=result["moved_plain"],
           moved_ogpsa=result["moved_ogpsa"], target_change_ogpsa=result["target_change_ogpsa"],
           basis_bytes_total=first.get("basis_bytes_total"), param_numel=first.get("param_numel"),
           worst_cos_after=max((abs(r[f"cos_after/{n}"]) for r in result["steps"] for n in REFS), default=None),
           losses=[h["loss"] for h in result["history"]])
    return result


def check_first_order(r: dict, workflow: str, engine: str) -> None:
    assert r["rebuilds"] and all(e["engine"] == engine for e in r["rebuilds"])
    # float32 rows, rank 3: the projection acts on float32 weights (master partitions under ZeRO-3)
    first = r["rebuilds"][0]
    assert first["rank"] == 3 and first["basis_bytes_total"] == 3 * 4 * first["param_numel"]
    assert r["steps"] and all(abs(s[f"cos_after/{n}"]) < 1e-4 for s in r["steps"] for n in REFS)
    assert r["moved_plain"] > 0.01, "the learning rate must visibly move the reference losses under plain training"
    assert r["moved_ogpsa"] * 10 <= r["moved_plain"]
    assert r["target_change_ogpsa"] < -0.05  # the stage still learns what it trains on


# --- 1. ZeRO-3, bf16 mixed precision, float32 master weights, one GPU, stock llamafactory-cli ---------------

# SFT under AdamW with the default update target (the flagship recipes' set-up); DPO under plain SGD
ZERO3_RUNS = {"sft": {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 3},
              "dpo": {"optim": "sgd", "learning_rate": 0.02, "max_steps": 4}}


@pytest.mark.parametrize("workflow", ["sft", "dpo"])
def test_zero3_one_gpu(tiny, tmp_path, workflow):
    extra = {} if CUDA else {"ddp_backend": "gloo"}
    r = first_order(tiny, tmp_path, workflow, f"zero3_{workflow}", env=ONE_RANK, deepspeed=str(Z3_CONFIG),
                    max_grad_norm=0.0, **ZERO3_RUNS[workflow], **extra)
    check_first_order(r, workflow, "zero3")


# --- 2. FSDP2 end to end through accelerate; FSDP1 refused before launch -----------------------------------

FSDP2 = {"fsdp": "full_shard auto_wrap",
         "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}}


@needs_cuda
@pytest.mark.parametrize("workflow", ["sft", "dpo"])
def test_fsdp2_one_gpu(tiny, tmp_path, workflow):
    r = first_order(tiny, tmp_path, workflow, f"fsdp2_{workflow}", env=ONE_RANK, max_grad_norm=0.0,
                    **ZERO3_RUNS[workflow], **FSDP2)
    check_first_order(r, workflow, "fsdp2")


def test_fsdp1_refused_with_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = stage_config(tiny, out, "sft", True, max_steps=1, fsdp="full_shard auto_wrap",
                       fsdp_config={"version": 1, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    proc = run_cli(cfg, tmp_path / "run", env=ONE_RANK, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ogpsa: error:")]
    record("fsdp1_refused", returncode=proc.returncode, errors=errors)
    assert proc.returncode == 2 and len(errors) == 1
    assert "fsdp: OGPSA supports FSDP2 only" in errors[0]
    assert not out.exists()


# --- 2b. the null space under ZeRO-3 and FSDP2: each MLP linear's outputs on the reference inputs kept ------

NULL_RUN = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 4, "max_grad_norm": 0.0}


def null_space_check(tiny, tmp_path, label: str, env=None, **engine) -> None:
    """A plain and a null-space SFT run (AdamW, default update target) of one engine: every MLP linear's
    change, applied to the reference inputs, stays within the null-space bound (plus the saved weights'
    rounding in bf16), plain moves those outputs more than twice as far, and the safety loss falls."""
    import torch

    x = reference_inputs(tiny, MLP)
    start = load_state(Path(tiny["model"]))
    outs = {}
    for kind, keys in (("plain", {"stage": "sft"}), ("null", null_keys())):
        outs[kind] = tmp_path / kind
        run_cli(base_config(tiny, outs[kind], **PRECISION, **NULL_RUN, **keys, **engine), tmp_path / f"run_{kind}", env=env)
    after = {k: load_state(v) for k, v in outs.items()}
    rounding = 2.0 ** -8 if CUDA else 1e-6  # bf16 weights saved on CUDA: one rounding of W0 + dW per entry
    worst = []
    for name in MLP:
        w0 = start[f"{name}.weight"].double()
        dw = after["null"][f"{name}.weight"].double() - w0
        dw_plain = after["plain"][f"{name}.weight"].double() - w0
        moved = float((dw @ x[name].T).norm())
        bound = float(torch.linalg.matrix_norm(dw, ord=2)) * null_energy(x[name], ALPHA) ** 0.5
        scale = float((w0 @ x[name].T).norm())
        worst.append({"layer": name, "moved": moved, "bound": bound, "plain_moved": float((dw_plain @ x[name].T).norm()),
                      "scale": scale})
    events = [r for r in ogpsa_log(outs["null"]) if r.get("event") == "rebuild"]
    losses = [h["loss"] for h in log_history(outs["null"]) if "loss" in h]
    record(label, engine=events[0].get("engine") if events else None, layers=worst, losses=losses,
           null_dims=events[0].get("null_dims") if events else None)
    assert events and events[0]["method"] == "null_space" and 0 < events[0]["null_dims"] < events[0]["input_dims"]
    assert losses[-1] < losses[0] - 0.1, losses
    for w in worst:
        assert w["moved"] <= w["bound"] * (1 + 1e-3) + rounding * w["scale"], w
        assert w["plain_moved"] > 2 * w["moved"], w


def test_null_space_zero3_one_gpu(tiny, tmp_path):
    extra = {} if CUDA else {"ddp_backend": "gloo"}
    null_space_check(tiny, tmp_path, "null_space_zero3", env=ONE_RANK, deepspeed=str(Z3_CONFIG), **extra)


@needs_cuda
def test_null_space_fsdp2_one_gpu(tiny, tmp_path):
    null_space_check(tiny, tmp_path, "null_space_fsdp2", env=ONE_RANK, **FSDP2)


# --- 3. first-order checks on the tiny model in bf16, one process ------------------------------------------

@pytest.mark.parametrize("workflow", ["sft", "dpo"])
def test_first_order_one_process(tiny, tmp_path, workflow):
    """Plain SGD, rebuild every step (tests/test_ogpsa_sft.py and test_ogpsa_dpo.py, in bf16 on a GPU)."""
    lr = {"sft": 0.05, "dpo": 0.02}[workflow]
    r = first_order(tiny, tmp_path, workflow, f"one_process_{workflow}", optim="sgd", learning_rate=lr,
                    max_steps=4, max_grad_norm=0.0)
    check_first_order(r, workflow, "ddp")  # whole tensors: the layout one process and DDP share
    assert all(0 < h["ogpsa/removed_fraction"] < 1 for h in r["history"])
    assert [e["step"] for e in r["rebuilds"]] == [0, 1, 2, 3]


def grads(gen, dtype):
    return [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES]


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_projection_on_cuda(dtype, tol, granularity):
    gen = torch.Generator(device="cuda").manual_seed(0)
    refs = [grads(gen, dtype) for _ in range(3)]
    basis = build_basis(refs, granularity)
    assert all(d.device.type == "cuda" and d.dtype == dtype for d in basis.directions)
    g = grads(gen, dtype)
    project_(g, basis)
    worst = max(abs(c) for c in residual_cosines(g, refs))
    record("projection_on_cuda", dtype=str(dtype), granularity=granularity, worst_cos_after=worst)
    assert worst < tol


@needs_cuda
def test_null_space_projection_reads_nothing_back():
    """The null space's per-step transforms on CUDA: no HtoD copy, and at most one DtoH read each (the
    removed norm the log records)."""
    from torch.profiler import ProfilerActivity, profile

    from ogpsa.plugin.methods.null_space.maths import anchor, build_space, project_rows_, restore_

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(512, 896, generator=gen, device="cuda")
    space = build_space(x.T @ x, ALPHA)
    g = torch.randn(4864, 896, generator=gen, device="cuda")
    w = torch.randn(4864, 896, generator=gen, device="cuda")
    project_rows_(g, space)  # warm-up
    torch.cuda.synchronize()
    counts = {}
    for name, call in (("project_rows_", lambda: project_rows_(g, space)),
                       ("anchor+restore_", lambda: restore_(w, space, anchor(w, space)))):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        counts[name] = {"htod": sum("Memcpy HtoD" in n for n in names), "dtoh": sum("Memcpy DtoH" in n for n in names)}
    record("null_space_host_device_copies", **counts)
    assert all(c["htod"] == 0 and c["dtoh"] <= 1 for c in counts.values()), counts


@needs_cuda
def test_no_host_device_copy_inside_the_step():
    """The projection reads the basis where it lives: no HtoD/DtoH memcpy but the one metrics sync."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(1)
    refs = [grads(gen, torch.bfloat16) for _ in range(3)]
    basis = build_basis(refs, "tensor")
    g = grads(gen, torch.bfloat16)
    project_(g, basis)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        project_(g, basis)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    htod = [n for n in names if "Memcpy HtoD" in n]
    dtoh = [n for n in names if "Memcpy DtoH" in n]
    record("host_device_copies", memcpy_htod=len(htod), memcpy_dtoh=len(dtoh))
    assert len(htod) == 0
    assert len(dtoh) <= 1  # the single .tolist() of the packed metrics
