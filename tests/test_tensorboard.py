"""`report_to: tensorboard`: the OGPSA metrics reach TensorBoard's event files beside the trainer's own."""

from pathlib import Path

import pytest
from helpers import REFS, base_config, log_history, ogpsa_keys, ogpsa_log, run_cli


def read_scalars(out: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard itself reads the run's event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(out.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_ogpsa_scalars_reach_tensorboard_at_the_trainer_steps(tiny, tmp_path):
    """6 steps, logged every 2, rebuilt at steps 0 and 4: each logged value is the mean of its two steps."""
    out = tmp_path / "out"
    cfg = base_config(tiny, out, max_steps=6, logging_steps=2, report_to="tensorboard",
                      **ogpsa_keys(ogpsa_refresh_steps=4))
    run_cli(cfg, tmp_path / "run")
    tb = read_scalars(out)
    logged = [h for h in log_history(out) if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    # the trainer's own loss and every OGPSA metric of trainer_state.json, at the same steps, same values
    assert tb["train/loss"] == pytest.approx({h["step"]: h["loss"] for h in logged}, rel=1e-6)
    keys = {k for h in logged for k in h if k.startswith("ogpsa/")}
    expected = {"removed_fraction", "grad_norm", "projected_blocks", "update_in_span_norm", "rebuild_seconds",
                "rebuilds"} | {f"{kind}/{ref}" for kind in ("cos", "cos_after") for ref in REFS}
    assert keys == {f"ogpsa/{k}" for k in expected}
    for key in keys:
        want = {h["step"]: h[key] for h in logged if key in h}
        assert tb[f"train/{key}"] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    # independently of the trainer's log: ogpsa_log.jsonl's per-step values, averaged over each interval
    steps = {r["step"]: r for r in ogpsa_log(out) if "removed_fraction" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for key in ["removed_fraction", "grad_norm"] + [f"cos/{ref}" for ref in REFS]:
        means = {s: (steps[s - 1][key] + steps[s][key]) / 2 for s in (2, 4, 6)}
        assert tb[f"train/ogpsa/{key}"] == pytest.approx(means, rel=1e-5), key
    # cos_after is measured on logging steps only; rebuilds counts the builds so far (step 0, then before step 5)
    assert tb["train/ogpsa/cos_after/toy_math_ref"] == pytest.approx({s: steps[s]["cos_after/toy_math_ref"]
                                                                      for s in (2, 4, 6)}, abs=1e-9)
    assert tb["train/ogpsa/rebuilds"] == {2: 1.0, 4: 1.0, 6: 2.0}
    assert sorted(tb["train/ogpsa/rebuild_seconds"]) == [2, 6]
