"""A resumed OGPSA run equals the uninterrupted one: the basis, the step it was built at and the
update-target coordinates travel with every checkpoint."""

import shutil

import pytest

from helpers import base_config, load_state, max_diff, ogpsa_keys, ogpsa_log, run_cli

from ogpsa.pipelines.runner import summarize


def _interrupt_after(out, step: int, last: int) -> None:
    """What a run killed after checkpoint `step` leaves behind: later checkpoints, final weights and
    log records of the lost steps are gone or stale (the log keeps them: the resume must cut them)."""
    shutil.rmtree(out / f"checkpoint-{last}")
    for name in ("model.safetensors", "trainer_state.json", "train_results.json", "all_results.json"):
        (out / name).unlink(missing_ok=True)


# AdamW with the update target (coordinates in the state), rebuild every 2 steps, checkpoint at 3: the
# uninterrupted run projects step 4 with the basis built at step 2; a fresh rebuild at 3 would not.
SIX_STEPS = {"optim": "adamw_torch", "learning_rate": 2e-3, "max_steps": 6, "save_strategy": "steps", "save_steps": 3,
             "overwrite_output_dir": False, **ogpsa_keys(ogpsa_refresh_steps=2)}


@pytest.fixture(scope="module")
def whole(trained):
    """The uninterrupted 6-step run (read only). Training is deterministic: a copy of its folder is what
    an attempt of the same run leaves behind, so the tests interrupt copies instead of training again."""
    return trained(**SIX_STEPS)


def _attempt(whole, out, last: int = 6):
    """A copy of the uninterrupted run, then what a kill after checkpoint-3 leaves of it."""
    shutil.copytree(whole, out)
    _interrupt_after(out, 3, last)
    return out


def test_resume_equals_uninterrupted_run(tiny, tmp_path, whole):
    cfg = base_config(tiny, None, **SIX_STEPS)
    saved = sorted(p.name for p in (whole / "checkpoint-3" / "ogpsa").iterdir())
    assert saved == ["replicated.pt"]

    resumed = _attempt(whole, tmp_path / "resumed")
    proc = run_cli({**cfg, "output_dir": str(resumed), "resume_from_checkpoint": str(resumed / "checkpoint-3")},
                   tmp_path / "run_resume")
    assert "resumed the subspace built at step 2" in proc.stderr + proc.stdout
    gap = max_diff(load_state(whole), load_state(resumed))
    print(f"resumed vs uninterrupted: {gap:.2e}")
    assert gap < 1e-6, f"resumed run differs from the uninterrupted one by {gap:.2e}"
    log_whole, log_resumed = ogpsa_log(whole), ogpsa_log(resumed)
    assert [r["step"] for r in log_resumed if r.get("event") == "rebuild"] == [0, 2, 4]
    assert [r["step"] for r in log_resumed if "removed_fraction" in r] == [1, 2, 3, 4, 5, 6]
    assert len(log_whole) == len(log_resumed)
    for a, b in zip(log_whole, log_resumed):
        assert a.keys() == b.keys() and a.get("removed_fraction") == b.get("removed_fraction")
    assert summarize(str(resumed))["ogpsa"]["rebuilds"] == summarize(str(whole))["ogpsa"]["rebuilds"] == 3

    # the counterfactual: without the saved state the resume rebuilds at step 3 and drifts
    fresh = _attempt(whole, tmp_path / "fresh")
    shutil.rmtree(fresh / "checkpoint-3" / "ogpsa")
    proc = run_cli({**cfg, "output_dir": str(fresh), "resume_from_checkpoint": str(fresh / "checkpoint-3")},
                   tmp_path / "run_fresh")
    assert "resuming at step 3 with a fresh subspace" in proc.stderr + proc.stdout
    drift = max_diff(load_state(whole), load_state(fresh))
    print(f"resumed with a fresh rebuild at the resume step: {drift:.2e}")
    assert drift > 100 * max(gap, 1e-8)
    assert [r["step"] for r in ogpsa_log(fresh) if r.get("event") == "rebuild"] == [0, 2, 3, 4]


def test_a_basis_saved_under_other_settings_is_not_reused(tiny, tmp_path, whole):
    """Changing the reference sets between the attempts: the saved basis is refused, rebuilt at the resume step."""
    out = _attempt(whole, tmp_path / "out")
    cfg = {**base_config(tiny, out, **SIX_STEPS), "ogpsa_reference": "toy_math_ref,toy_general_ref",
           "resume_from_checkpoint": str(out / "checkpoint-3")}
    proc = run_cli(cfg, tmp_path / "run2")
    assert "was saved with reference=" in proc.stderr + proc.stdout
    rebuilds = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    # step 2 keeps step 0's directions (rank 3 + 3); the resume starts afresh with 2 sets, and step 4
    # keeps the resume's 2 directions beside its own 2
    assert [(r["step"], r["rank"], r["reason"]) for r in rebuilds] == [
        (0, 3, "start"), (2, 6, "scheduled"), (3, 2, "resume"), (4, 4, "scheduled")]


@pytest.mark.long  # three one-process runs
def test_checkpoints_without_the_basis_resume_with_a_rebuild(tiny, tmp_path):
    """ogpsa_save_basis: false: no basis in the checkpoint (the default's is 4 bytes per trainable
    parameter and reference set in float32), and a resume rebuilds at its step and trains on."""
    import torch

    cfg = base_config(tiny, None, max_steps=4, save_strategy="steps", save_steps=2, overwrite_output_dir=False,
                      **ogpsa_keys(ogpsa_refresh_steps=3))
    full, slim = tmp_path / "full", tmp_path / "slim"
    run_cli({**cfg, "output_dir": str(full)}, tmp_path / "run_full")
    run_cli({**cfg, "output_dir": str(slim), "ogpsa_save_basis": False}, tmp_path / "run_slim")
    numel = sum(t.numel() for t in load_state(full).values())
    saved = full / "checkpoint-2" / "ogpsa" / "replicated.pt"
    size = saved.stat().st_size
    print(f"basis file {size} bytes for {numel} trainable parameters and 3 reference sets ({size / numel:.2f} B each)")
    basis_bytes = next(r for r in ogpsa_log(full) if r.get("event") == "rebuild")["basis_bytes"]
    assert basis_bytes <= 12 * numel <= basis_bytes + 65536 and basis_bytes <= size <= basis_bytes + 65536
    assert torch.load(saved, weights_only=True)["basis"]["directions"][0].dtype == torch.float32
    for step in (2, 4):
        assert (slim / f"checkpoint-{step}" / "model.safetensors").exists()
        assert not (slim / f"checkpoint-{step}" / "ogpsa").exists()

    _interrupt_after(slim, 2, 4)
    proc = run_cli({**cfg, "output_dir": str(slim), "ogpsa_save_basis": False,
                    "resume_from_checkpoint": str(slim / "checkpoint-2")}, tmp_path / "run_resume")
    assert "ogpsa_save_basis is false: rebuilding the subspace at the resume step 2" in proc.stderr + proc.stdout
    assert [r["step"] for r in ogpsa_log(slim) if r.get("event") == "rebuild"] == [0, 2, 3]
    assert [r["step"] for r in ogpsa_log(slim) if "removed_fraction" in r] == [1, 2, 3, 4]
    assert all(r["removed_fraction"] > 0 for r in ogpsa_log(slim) if "removed_fraction" in r)
    assert load_state(slim).keys() == load_state(full).keys()
    assert not (slim / "checkpoint-4" / "ogpsa").exists()


def test_save_basis_setting_is_a_boolean():
    from ogpsa.plugin.settings import OGPSAConfigError, split_ogpsa_args

    base = {"stage": "ogpsa_sft", "ogpsa_reference": "a"}
    assert split_ogpsa_args(base)[0].ogpsa_save_basis is True
    assert split_ogpsa_args({**base, "ogpsa_save_basis": False})[0].ogpsa_save_basis is False
    assert split_ogpsa_args({**base, "ogpsa_save_basis": "false"})[0].ogpsa_save_basis is False  # --flag text
    with pytest.raises(OGPSAConfigError, match="x.yaml: ogpsa_save_basis: expected true or false, got 1"):
        split_ogpsa_args({**base, "ogpsa_save_basis": 1}, "x.yaml: ")
