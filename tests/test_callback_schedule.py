"""The callback's schedule without a training run: when it builds, follow-ups, what a resume keeps.

`OGPSACallback` drives any object with the constraint interface (`ogpsa.plugin.constraint`); a
small counting constraint written here stands in for a method, so only the callback's own
decisions are under test: build at step 0 and every `ogpsa_refresh_steps`, one follow-up when the
constraint asks for it, the log truncated to what happened before the resume step, the state taken
from the checkpoint instead of a rebuild.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from ogpsa.plugin.callback import LOG_FILE, OGPSACallback, keep_log_before, rebuild_due
from ogpsa.plugin.settings import OGPSAArguments


class Counting:
    """A constraint that records what the callback asks of it; it asks for one follow-up after the
    builds listed in `followup_after`."""

    method = "counting"
    step_removed_key = "counting_removed_norm"

    def __init__(self, followup_after=()):
        self.followup_after = set(followup_after)
        self.followup_due = False
        self.builds: list[tuple[int, bool]] = []
        self.projected = 0

    def supports(self, layout) -> Optional[str]:
        return None

    def setup(self, ctx) -> None:
        self.params = ctx.params

    def ready(self) -> bool:
        return bool(self.builds)

    def build(self, ctx) -> dict[str, Any]:
        self.builds.append((ctx.step, ctx.followup))
        self.followup_due = ctx.step in self.followup_after and not ctx.followup
        return {"builds": len(self.builds)}

    def project_grad(self, group: int, measure: bool) -> None:
        self.projected += 1

    def grad_record(self) -> Optional[dict[str, float]]:
        return {"grad_norm": 1.0, "removed_fraction": 0.5}

    def project_step(self, group: int) -> float:
        return 4.0

    def state_dict(self) -> dict[str, Any]:
        return {"builds": [list(b) for b in self.builds], "followup_due": self.followup_due}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.builds = [tuple(b) for b in saved["builds"]]
        self.followup_due = saved["followup_due"]

    def identity(self) -> dict[str, Any]:
        return {"counting": 1}


def _callback(tmp_path, refresh: int, followup_after=(), resume: str | None = None, step: int = 0):
    settings = OGPSAArguments(ogpsa_reference="a_ref", ogpsa_refresh_steps=refresh, stage="ogpsa_sft")
    cb = OGPSACallback(settings)
    cb.constraint = Counting(followup_after)
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=1, report_to=[], use_cpu=True,
                             resume_from_checkpoint=resume)
    state = TrainerState(global_step=step, max_steps=20)
    model = torch.nn.Linear(2, 2)
    cb.on_train_begin(args, state, TrainerControl(), model=model, optimizer=None)
    return cb, args, state


def _run_steps(cb, args, state, last: int):
    """on_step_begin .. on_optimizer_step of every step up to `last`, as the trainer calls them."""
    while state.global_step < last:
        cb.on_step_begin(args, state, TrainerControl())
        cb.on_pre_optimizer_step(args, state, TrainerControl())
        cb.on_optimizer_step(args, state, TrainerControl())
        state.global_step += 1


def _log(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]


def test_rebuild_due():
    assert rebuild_due(0, 0, 3, False) == (False, False)  # just built
    assert rebuild_due(3, 0, 3, False) == (True, False)
    assert rebuild_due(4, 3, 3, False) == (False, False)
    assert rebuild_due(1, 0, 3, True) == (False, True)  # the follow-up the constraint asked for
    assert rebuild_due(6, 6, 3, True) == (False, False)  # built (or restored) at this step already
    assert rebuild_due(30, 0, 0, False) == (False, False)  # 0: one build per stage


def test_builds_every_k_steps_with_one_followup(tmp_path):
    cb, args, state = _callback(tmp_path, refresh=3, followup_after={0, 6})
    _run_steps(cb, args, state, 8)
    assert cb.constraint.builds == [(0, False), (1, True), (3, False), (6, False), (7, True)]
    assert cb.rebuilds == 5 and cb.built_at_step == 7
    log = _log(tmp_path)
    assert [(r["step"], r["builds"]) for r in log if r.get("event") == "rebuild"] == [
        (0, 1), (1, 2), (3, 3), (6, 4), (7, 5)]
    steps = [r for r in log if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # ogpsa_target=update: the norm the step projection removed, under the constraint's own key
    assert all(r["counting_removed_norm"] == 2.0 and r["removed_fraction"] == 0.5 for r in steps)
    metrics = cb.pop_log_metrics()
    assert metrics["ogpsa/rebuilds"] == 5.0 and metrics["ogpsa/counting_removed_norm"] == 2.0


def test_no_rebuild_after_the_first_with_refresh_zero(tmp_path):
    cb, args, state = _callback(tmp_path, refresh=0)
    _run_steps(cb, args, state, 10)
    assert cb.constraint.builds == [(0, False)]


def test_resume_takes_the_saved_state_and_truncates_the_log(tmp_path):
    cb, args, state = _callback(tmp_path, refresh=3)
    _run_steps(cb, args, state, 4)
    cb.on_save(args, state, TrainerControl())  # checkpoint-4 holds the build of step 3
    _run_steps(cb, args, state, 7)  # an attempt that dies after step 7: a build at 6, records 5..7
    assert [r["step"] for r in _log(tmp_path) if r.get("event")] == [0, 3, 6]

    folder = tmp_path / "checkpoint-4"
    assert (folder / "ogpsa" / "rank0-of-1.pt").is_file()
    resumed, args, state = _callback(tmp_path, refresh=3, resume=str(folder), step=4)
    assert resumed.constraint.builds == [(0, False), (3, False)]  # restored, not rebuilt
    assert resumed.built_at_step == 3 and resumed.rebuilds == 2
    log = _log(tmp_path)  # what happened before step 4 only: no record of the lost attempt
    assert [r["step"] for r in log if r.get("event")] == [0, 3]
    assert [r["step"] for r in log if "event" not in r] == [1, 2, 3, 4]
    _run_steps(resumed, args, state, 7)
    assert resumed.constraint.builds[-1] == (6, False)
    assert [r["step"] for r in _log(tmp_path) if "event" not in r] == list(range(1, 8))


def test_resume_rebuilds_when_the_checkpoint_has_no_state(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    cb, args, state = _callback(tmp_path, refresh=3, resume=str(tmp_path / "checkpoint-5"), step=5)
    assert cb.constraint.builds == [(5, False)]


def test_keep_log_before(tmp_path):
    path = tmp_path / LOG_FILE
    records = [{"event": "rebuild", "step": 0}, {"step": 1}, {"step": 2}, {"event": "rebuild", "step": 2},
               {"step": 3}]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records) + "not json\n")
    keep_log_before(str(path), 2)  # a step record of step 2 ends step 1; a build at 2 is redone
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    keep_log_before(str(path), 0)
    assert not path.exists()
