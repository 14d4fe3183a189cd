"""`ogpsa_method: null_space` under DDP (2 processes, gloo) and across a resume (`-m multiprocess`, and `-m long` for the one-process runs).

DDP: the reference batches are split across ranks and the input covariances summed, so two
processes keep the same null spaces as one, and train the same weights. Resume: the null spaces
and the update target's anchors travel with the checkpoint, so a resumed run equals the
uninterrupted one, even with a rebuild schedule that a fresh rebuild at the resume step would break.
"""

import shutil

import pytest
from helpers import TORCHRUN, base_config, load_state, max_diff, null_keys, ogpsa_log, run_cli


@pytest.mark.multiprocess
def test_two_processes_keep_the_same_null_spaces_as_one(tiny, tmp_path):
    states = {}
    for label, keys in (("plain", {}), ("null", null_keys())):
        for nproc in (1, 2):
            out = tmp_path / f"{label}_{nproc}"
            cfg = base_config(tiny, out, per_device_train_batch_size=8 // nproc, max_samples=8, max_steps=2,
                              optim="adamw_torch", learning_rate=1e-3, max_grad_norm=1.0, **keys)
            if nproc == 2:
                cfg["ddp_backend"] = "gloo"
            run_cli(cfg, tmp_path / f"run_{label}_{nproc}", env=TORCHRUN if nproc == 2 else None)
            states[label, nproc] = load_state(out)
    plain_gap = max_diff(states["plain", 1], states["plain", 2])
    null_gap = max_diff(states["null", 1], states["null", 2])
    effect = max_diff(states["null", 1], states["plain", 1])
    print(f"plain 1v2 {plain_gap:.2e}, null_space 1v2 {null_gap:.2e}, null_space - plain {effect:.2e}")
    assert null_gap <= max(10 * plain_gap, 1e-6)
    assert effect > 100 * max(null_gap, 1e-7)
    one, two = ogpsa_log(tmp_path / "null_1")[0], ogpsa_log(tmp_path / "null_2")[0]
    assert two["world_size"] == 2
    # the same reference tokens (split over ranks, then summed) and the same null dimension per layer
    assert {k: v for k, v in one.items() if k.startswith(("null_dim/", "input_tokens/"))} == {
        k: v for k, v in two.items() if k.startswith(("null_dim/", "input_tokens/"))}


@pytest.mark.long  # three one-process runs; test_resume covers the gradient span's resume in the default suite
def test_resume_equals_uninterrupted_null_space_run(tiny, tmp_path):
    cfg = base_config(tiny, None, optim="adamw_torch", learning_rate=2e-3, max_steps=6, save_strategy="steps",
                      save_steps=3, overwrite_output_dir=False, **null_keys(ogpsa_refresh_steps=2))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out in (whole, resumed):
        run_cli({**cfg, "output_dir": str(out)}, tmp_path / f"run_{out.name}")
    shutil.rmtree(resumed / "checkpoint-6")
    for name in ("model.safetensors", "trainer_state.json"):
        (resumed / name).unlink()
    proc = run_cli({**cfg, "output_dir": str(resumed), "resume_from_checkpoint": str(resumed / "checkpoint-3")},
                   tmp_path / "run_resume")
    assert "resumed the subspace built at step 2" in proc.stderr + proc.stdout
    assert max_diff(load_state(whole), load_state(resumed)) == 0.0
    rebuilds = [r["step"] for r in ogpsa_log(resumed) if r.get("event") == "rebuild"]
    assert rebuilds == [0, 2, 4]


@pytest.mark.long  # two one-process runs; test_ogpsa_sft checks the gradient span's accumulation
def test_gradient_accumulation_1x8_equals_8x1_under_null_space(tiny, tmp_path):
    """The null-space projection acts on the accumulated gradient: 8 micro-batches of 1 train as 1 batch of 8."""
    states = {}
    for label, bs, ga in (("1x8", 1, 8), ("8x1", 8, 1)):
        out = tmp_path / label
        cfg = base_config(tiny, out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2,
                          optim="sgd", learning_rate=0.05, max_grad_norm=0.0, **null_keys())
        run_cli(cfg, tmp_path / f"run_{label}")
        states[label] = load_state(out)
    start = load_state(tiny["model"])
    moved = max_diff(states["8x1"], start)
    diff = max_diff(states["1x8"], states["8x1"])
    print(f"max |w_1x8 - w_8x1| = {diff:.2e}, max update = {moved:.2e}")
    assert moved > 1e-3
    assert diff < 1e-3 * moved
