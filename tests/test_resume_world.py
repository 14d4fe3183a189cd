"""Resuming on another number of processes (`-m multiprocess`: 2-process gloo runs).

A replicated state (one process, DDP) is one file that any world size reads; a sharded one (ZeRO,
FSDP2) is re-cut to the new ranks' pieces, or refused with the world size it needs. Every run sees
the same global batch (8 samples, all of them every step), so a run that changes its number of
processes at a checkpoint trains as the uninterrupted one, to float32 reduction-order noise.
"""

import json
import shutil

import pytest
import torch
from helpers import TORCHRUN, base_config, deepspeed_config, load_state, null_keys, ogpsa_keys, ogpsa_log, run_cli

pytestmark = pytest.mark.multiprocess

def _config(tiny, nproc: int, **keys) -> dict:
    cfg = base_config(tiny, None, **{
        "per_device_train_batch_size": 8 // nproc, "max_samples": 8, "max_steps": 6, "optim": "sgd",
        "learning_rate": 0.05, "max_grad_norm": 1.0, "save_strategy": "steps", "save_steps": 2,
        "overwrite_output_dir": False, **keys})
    return cfg


def _run(tiny, tmp_path, label: str, nproc: int, resume=None, check=True, **keys):
    out = tmp_path / label
    cfg = {**_config(tiny, nproc, **keys), "output_dir": str(out)}
    if nproc == 2:  # inside torchrun (a one-process run outside it has no process group)
        cfg["ddp_backend"] = "gloo"
    if resume is not None:
        cfg["resume_from_checkpoint"] = str(resume)
    proc = run_cli(cfg, tmp_path / f"run_{label}", env=TORCHRUN if nproc == 2 else None, check=check)
    return out, proc.stdout + proc.stderr, proc.returncode


def _gap(a, b) -> float:
    keys = set(a) & set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def _weights(out):
    from safetensors.torch import load_file

    adapter = out / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.exists() else load_state(out)


@pytest.mark.parametrize("method", ["gradient_span", "null_space_lora"])
def test_replicated_state_resumes_on_one_process_and_back_on_two(tiny, tmp_path, method):
    """2 processes to step 2, 1 process to step 4, 2 processes to step 6: the uninterrupted 2-process
    run's weights, and the builds of its schedule (no rebuild at either resume step). The null
    space under LoRA is the case that stopped before: a rebuild at the resume step is refused there
    (B has moved), so it only runs if the saved null spaces are taken."""
    if method == "gradient_span":
        keys = ogpsa_keys(ogpsa_refresh_steps=3)  # a fresh rebuild at a resume step would change the run
    else:
        keys = {**null_keys(), "finetuning_type": "lora", "lora_target": "all", "learning_rate": 0.5}
    whole, _, _ = _run(tiny, tmp_path, "whole", 2, **keys)
    assert sorted(p.name for p in (whole / "checkpoint-2" / "ogpsa").iterdir()) == ["replicated.pt"]
    one, log1, _ = _run(tiny, tmp_path, "one", 1, resume=whole / "checkpoint-2", **keys)
    back, log2, _ = _run(tiny, tmp_path, "back", 2, resume=one / "checkpoint-4", **keys)
    assert "resumed the subspace built at step 0" in log1
    assert "resumed the subspace built at step" in log2 and "fresh subspace" not in log1 + log2
    reference = _weights(whole)
    if method == "gradient_span":
        update = _gap(reference, load_state(tiny["model"]))
    else:  # LoRA B starts at zero: its size is the update's
        update = max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k)
    # float32 reduction order (1 process against 2) and the update target's rewrite of the weights
    # after each step, which rounds at the weights' own scale: a few ulps of the largest weight
    ulp = torch.finfo(torch.float32).eps * max(float(v.float().abs().max()) for v in reference.values())
    for out in (one, back):
        gap = _gap(reference, _weights(out))
        print(f"{method}: {out.name} vs uninterrupted {gap:.2e} (update {update:.2e}, ulp {ulp:.1e})")
        assert gap <= max(1e-5 * update, 8 * ulp)
    # each resumed run builds only where the uninterrupted one did after its resume step
    builds = [r["step"] for r in ogpsa_log(whole) if r.get("event") == "rebuild"]
    assert [r["step"] for r in ogpsa_log(one) if r.get("event") == "rebuild"] == [b for b in builds if 2 <= b < 4]
    assert [r["step"] for r in ogpsa_log(back) if r.get("event") == "rebuild"] == [b for b in builds if 4 <= b < 6]


def test_sharded_state_is_recut_for_one_process_or_refused(tiny, tmp_path, tmp_path_factory):
    """ZeRO-2 on 2 ranks (each saves its piece of the basis) resumed on 1 process without DeepSpeed
    (plain SGD: no optimizer state to carry; DeepSpeed itself refuses its partitioned optimizer state
    on another world size): the two pieces are joined into the one process's whole parameters, and
    the run equals the uninterrupted one. With a rank's file missing the resume stops with the world
    size it needs."""
    path = tmp_path_factory.mktemp("ds") / "z2.json"
    path.write_text(json.dumps(deepspeed_config(2)))
    keys = ogpsa_keys(ogpsa_refresh_steps=3)
    whole, _, _ = _run(tiny, tmp_path, "whole", 2, deepspeed=str(path), **keys)
    assert sorted(p.name for p in (whole / "checkpoint-2" / "ogpsa").iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    one, log, _ = _run(tiny, tmp_path, "one", 1, resume=whole / "checkpoint-2", **keys)
    assert "re-cut from 2 ranks' pieces under zero2 to this run's ddp pieces" in log
    reference = load_state(whole)
    update = _gap(reference, load_state(tiny["model"]))
    gap = _gap(reference, load_state(one))
    ulp = torch.finfo(torch.float32).eps * max(float(v.float().abs().max()) for v in reference.values())
    print(f"zero2 on 2 ranks -> 1 process vs uninterrupted {gap:.2e} (update {update:.2e}, ulp {ulp:.1e})")
    assert gap <= max(1e-5 * update, 8 * ulp)
    assert [r["step"] for r in ogpsa_log(one) if r.get("event") == "rebuild"] == [3]

    broken = tmp_path / "broken_ckpt"
    shutil.copytree(whole / "checkpoint-2", broken)
    (broken / "ogpsa" / "rank1-of-2.pt").unlink()
    out, log, code = _run(tiny, tmp_path, "refused", 1, resume=broken, check=False, **keys)
    assert code == 2, log[-3000:]
    assert "resume on 2 ranks under zero2 with every rank's file, or set ogpsa_save_basis: false" in log
    assert not (out / "checkpoint-4").exists()


def test_sharded_null_space_state_is_recut_for_one_process(tiny, tmp_path, tmp_path_factory):
    """The null space under ZeRO-3 on 2 ranks (each rank's file: the replicated null spaces and its rows'
    anchors) resumed on 1 process: the null spaces are taken, the anchors taken again from the restored
    weights, and the run equals the uninterrupted one; no rebuild at the resume step."""
    path = tmp_path_factory.mktemp("ds") / "z3.json"
    path.write_text(json.dumps(deepspeed_config(3)))
    keys = null_keys()  # built once: a fresh build at the resume step would change the run
    whole, _, _ = _run(tiny, tmp_path, "whole", 2, deepspeed=str(path), **keys)
    assert sorted(p.name for p in (whole / "checkpoint-2" / "ogpsa").iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    one, log, _ = _run(tiny, tmp_path, "one", 1, resume=whole / "checkpoint-2", **keys)
    assert "re-cut from 2 ranks' pieces under zero3 to this run's ddp pieces" in log
    reference = load_state(whole)
    update = _gap(reference, load_state(tiny["model"]))
    gap = _gap(reference, load_state(one))
    ulp = torch.finfo(torch.float32).eps * max(float(v.float().abs().max()) for v in reference.values())
    print(f"null space zero3 on 2 ranks -> 1 process vs uninterrupted {gap:.2e} (update {update:.2e}, ulp {ulp:.1e})")
    assert gap <= max(1e-5 * update, 8 * ulp)
    assert [r["step"] for r in ogpsa_log(one) if r.get("event") == "rebuild"] == []
