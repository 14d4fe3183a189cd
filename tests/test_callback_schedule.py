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

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from ogpsa.plugin.callback import LOG_FILE, OGPSACallback, due_to_log, keep_log_before, rebuild_due
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
    assert rebuild_due(6, 5, 3, True) == (True, True)  # due and asked for at once: one build does both
    assert rebuild_due(7, 0, 1, False) == (True, False) and rebuild_due(7, 7, 1, False) == (False, False)
    assert rebuild_due(4, 2, 0, True) == (False, True)  # a follow-up still comes with refresh 0


def _schedule(refresh: int, last: int, followup_after=(), built_at: int = 0, start: int | None = None):
    """The builds [(step, follow-up?)] `rebuild_due` makes at steps `start`..`last - 1` (default: from
    the step after the build at `built_at`), where a build at a step of `followup_after` that is not
    itself a follow-up asks for one follow-up, as a constraint's `followup_due` does."""
    builds, followup_due = [], built_at in followup_after
    for step in range(built_at + 1 if start is None else start, last):
        due, followup = rebuild_due(step, built_at, refresh, followup_due)
        if due or followup:
            builds.append((step, followup))
            built_at, followup_due = step, step in followup_after and not followup
    return builds


@pytest.mark.parametrize("refresh,followup_after,builds", [
    (3, (), [(3, False), (6, False), (9, False)]),
    (1, (), [(s, False) for s in range(1, 10)]),
    (0, (), []),
    (4, {0}, [(1, True), (4, False), (8, False)]),  # the follow-up after the first build (LoRA's B = 0)
    (2, {0}, [(1, True), (2, False), (4, False), (6, False), (8, False)]),  # then the schedule, unshifted
    (0, {0}, [(1, True)]),  # refresh 0 (null space): the one build, and still its follow-up
    (3, {0, 1, 3}, [(1, True), (3, False), (4, True), (6, False), (9, False)]),  # no follow-up of a follow-up
])
def test_rebuild_steps_and_followups(refresh, followup_after, builds):
    """Steps 1..9 after the first build at step 0."""
    assert _schedule(refresh, 10, followup_after) == builds


def test_the_schedule_is_by_step_number_across_a_resume():
    """Resuming at step 5 of a K = 3 run: with the state built at 3 restored, the builds are the
    uninterrupted run's; with a fresh build at 5 (no saved state), the later builds still fall on the
    multiples of K, not K steps after the extra build."""
    whole = _schedule(3, 12)
    assert whole == [(3, False), (6, False), (9, False)]
    assert _schedule(3, 12, built_at=3, start=5) == [b for b in whole if b[0] >= 5]
    assert _schedule(3, 12, built_at=5, start=5) == [(6, False), (9, False)]


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
    assert (folder / "ogpsa" / "replicated.pt").is_file()
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


# ---- when the trainer logs: the projection measures cos_after only then ------------------------------


@pytest.mark.parametrize("logging", [
    {"logging_steps": 1}, {"logging_steps": 3}, {"logging_steps": 5, "logging_first_step": True},
    {"logging_steps": 0.25}, {"logging_steps": 0.1, "logging_first_step": True},
    {"logging_strategy": "epoch", "logging_first_step": True}, {"logging_strategy": "no"},
])
def test_due_to_log_is_the_trainers_own_logging_decision(tmp_path, logging):
    """For each step, `due_to_log` at its start says what transformers' DefaultFlowCallback decides at
    its end (ratios of max_steps rounded up, as TrainerState.compute_steps does)."""
    from transformers.trainer_callback import DefaultFlowCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **logging)
    state = TrainerState(max_steps=12)
    state.compute_steps(args, 12)
    mine, trainers = [], []
    for step in range(12):
        state.global_step = step
        mine.append(due_to_log(args, state))
        state.global_step = step + 1
        trainers.append(DefaultFlowCallback().on_step_end(args, state, TrainerControl()).should_log)
    assert mine == trainers
    assert any(mine) == (logging.get("logging_strategy") != "no")


def test_due_to_log_without_the_states_interval_rounds_the_ratio_up(tmp_path):
    """A state whose interval was not computed yet: the arguments' ratio of max_steps, rounded up
    (0.25 of 10 steps: every 3rd), as the trainer will compute it."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logging_steps=0.25)
    state = TrainerState(max_steps=10)
    state.logging_steps = None
    due = []
    for step in range(10):
        state.global_step = step
        due.append(due_to_log(args, state))
    assert [step + 1 for step, d in enumerate(due) if d] == [3, 6, 9]


# ---- the log a resume keeps: hand-made ogpsa_log.jsonl files ----------------------------------------


def _write_log(path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def _steps_kept(path) -> list[tuple[str, int]]:
    return [("build" if r.get("event") == "rebuild" else "step", r["step"])
            for r in map(json.loads, path.read_text().splitlines())]


# K = 2, checkpoints every 3 steps; the attempt died after step 5 (its records of 4 and 5 are lost work)
ATTEMPT = [
    '{"event": "rebuild", "step": 0, "rank": 3}\n', '{"removed_fraction": 0.1, "step": 1}\n',
    '{"removed_fraction": 0.2, "step": 2}\n', '{"event": "rebuild", "step": 2, "rank": 3}\n',
    '{"removed_fraction": 0.3, "step": 3}\n', '{"removed_fraction": 0.4, "step": 4}\n',
    '{"event": "rebuild", "step": 4, "rank": 3}\n', '{"removed_fraction": 0.5, "step": 5}\n',
]


@pytest.mark.parametrize("resume,kept", [
    (3, [("build", 0), ("step", 1), ("step", 2), ("build", 2), ("step", 3)]),
    (4, [("build", 0), ("step", 1), ("step", 2), ("build", 2), ("step", 3), ("step", 4)]),  # the build at 4 is redone
    (2, [("build", 0), ("step", 1), ("step", 2)]),
    (1, [("build", 0), ("step", 1)]),
    (9, [("build", 0), ("step", 1), ("step", 2), ("build", 2), ("step", 3), ("step", 4), ("build", 4), ("step", 5)]),
])
def test_a_resume_keeps_what_happened_before_its_step(tmp_path, resume, kept):
    path = tmp_path / LOG_FILE
    _write_log(path, ATTEMPT)
    keep_log_before(str(path), resume)
    assert _steps_kept(path) == kept
    assert path.read_text() == "".join(ATTEMPT[: len(kept)])  # the kept lines themselves, untouched
    assert not (tmp_path / f"{LOG_FILE}.tmp").exists()


def test_resume_truncation_reads_records_not_their_spelling(tmp_path):
    """Compact separators and another key order (a log written by hand or another JSON writer), blank
    lines, a torn last line, lines without a step or with a non-numeric one: records are judged by
    their fields, and only records survive."""
    path = tmp_path / LOG_FILE
    _write_log(path, ['{"step":3,"event":"rebuild"}\n', '{"step":2,"event":"rebuild"}\n', "\n",
                      '{"removed_fraction":0.1,"step":3}\n', '{"note": "no step"}\n', '{"step": "x"}\n',
                      "[1, 2]\n", '"text"\n', '{"step": 4, "removed_fr'])
    keep_log_before(str(path), 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 2, "event": "rebuild"}, {"removed_fraction": 0.1, "step": 3}]


def test_resume_truncation_ends_the_kept_log_with_a_newline(tmp_path):
    """A last record without its newline is kept as a whole line: the resumed run's first record
    appended after it is a line of its own."""
    path = tmp_path / LOG_FILE
    _write_log(path, ['{"event": "rebuild", "step": 0}\n', '{"removed_fraction": 0.1, "step": 1}'])
    keep_log_before(str(path), 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"removed_fraction": 0.2, "step": 2}) + "\n")
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [0, 1, 2]


def test_a_fresh_start_removes_the_log_and_a_missing_log_stays_missing(tmp_path):
    path = tmp_path / LOG_FILE
    keep_log_before(str(path), 4)  # resuming without a log (e.g. written elsewhere): nothing to cut
    assert not path.exists()
    _write_log(path, ATTEMPT)
    keep_log_before(str(path), 0)  # step 0: an earlier run into the same output_dir
    assert not path.exists()
