"""What a pipeline prints: short lines and one progress bar per stage and per evaluation, the full
logs in files.

Quiet (the default): a stage's command runs with its stdout and stderr in a log file in the stage's
folder (`train.log`); an evaluation, which runs in this process, runs with file descriptors 1 and 2
pointed at its log file (`eval.log`), so every writer lands there: print, logging handlers made
before, tqdm, warnings from C extensions. Meanwhile a thread polls the run's progress twice a second
and moves one bar on the terminal's stderr:

- a training stage: `trainer_log.jsonl` in the stage's folder, which LLaMA-Factory's LogCallback
  writes (rank 0 only, under torchrun too) at every logging step with `current_steps` and
  `total_steps`; LlamaBoard's own progress bar reads the same file.
- an evaluation (and the quickstart's preparation): the last tqdm status line in its log (`ogpsa
  eval` draws one bar per measure when the eval block's `progress` is on); without one the bar
  shows the time spent. Its closing line has the numbers, so this bar goes when it ends.

On a terminal the bar is redrawn in place; where stderr is a file or a pipe (CI, tests) its state
is written as a plain line once a minute and at the end.

A failed command prints the last lines of its log (`TAIL_LINES`), names the file and returns its
exit code. Verbose: the commands inherit the terminal and nothing is redirected, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Iterator

TAIL_LINES = 40
POLL_SECONDS = 0.5
SNAPSHOT_SECONDS = 60.0
# Each \r-separated segment of a tqdm line: "desc:  45%|####5     | 9/20 [00:01<00:01, ...]"
_TQDM = re.compile(r"^\s*(?:(?P<desc>.*?):\s*)?\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
# Metrics named in an evaluation's closing line, in this order, when present.
EVAL_KEYS = ("refusal_harmful", "refusal_benign", "nll_mean", "hhh_acc")


class Progress:
    """Where a bar stands: (done, total or None, note) from a run's files; `poll` is cheap."""

    def poll(self) -> tuple[int, int | None, str]:
        return 0, None, ""


class TrainerSteps(Progress):
    """Steps from LLaMA-Factory's `<output_dir>/trainer_log.jsonl` (read incrementally)."""

    def __init__(self, output_dir: str):
        self.lines = _Lines(os.path.join(output_dir, "trainer_log.jsonl"))
        self.state: tuple[int, int | None, str] = (0, None, "")

    def poll(self) -> tuple[int, int | None, str]:
        for line in self.lines.new():
            try:
                row = json.loads(line)
                done, total = int(row["current_steps"]), int(row["total_steps"])
            except (ValueError, KeyError, TypeError):
                continue  # an eval row or a partly written line
            loss = row.get("loss")  # the closing row has none: keep the last one shown
            note = f"loss {loss:.4g}" if isinstance(loss, (int, float)) else self.state[2]
            self.state = (done, total, note)
        return self.state


class TqdmInLog(Progress):
    """The last tqdm status written to a log file: (n, total, its description)."""

    def __init__(self, log_path: str):
        self.lines = _Lines(log_path, keep_partial=True)
        self.state: tuple[int, int | None, str] = (0, None, "")

    def poll(self) -> tuple[int, int | None, str]:
        for line in self.lines.new():
            for segment in reversed(line.split("\r")):
                match = _TQDM.match(segment)
                if match:
                    self.state = (int(match["n"]), int(match["total"]), (match["desc"] or "").strip())
                    break
        return self.state


class _Lines:
    """New lines of a growing file since the last call (a missing file has none yet)."""

    def __init__(self, path: str, keep_partial: bool = False):
        self.path, self.offset, self.rest, self.keep_partial = path, 0, "", keep_partial

    def new(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        text = self.rest + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self.rest = lines.pop()
        # a tqdm bar rewrites its line with \r and ends it only when it closes: look at it meanwhile
        return lines + [self.rest] if self.keep_partial and self.rest else lines


class Console:
    """Runs commands and evaluations quietly (logs in files, one bar each) or verbosely."""

    def __init__(self, verbose: bool = False, prefix: str = "[ogpsa pipeline]"):
        self.verbose, self.prefix = verbose, prefix

    def say(self, message: str) -> None:
        print(f"{self.prefix} {message}", flush=True)

    # ---- a command in a child process --------------------------------------------------------
    def run(self, cmd: list[str], log_path: str, label: str, progress: Progress | None = None) -> int:
        """Run `cmd`; quiet: output appended to `log_path` under one bar, its tail shown on failure."""
        if self.verbose:
            return subprocess.call(cmd)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            # unbuffered, so the log is current for `tail -f` and complete up to a crash
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with _Bar(label, progress or Progress(), sys.stderr, leave=True):
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            self.show_tail(log_path)
        return code

    # ---- work in this process ----------------------------------------------------------------
    @contextlib.contextmanager
    def captured(self, log_path: str, label: str, progress: Progress | None = None) -> Iterator[None]:
        """Quiet: everything written to file descriptors 1 and 2 inside goes to `log_path`, under
        one bar; an exception is written there too, the tail shown, and raised again."""
        if self.verbose:
            yield
            return
        _flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, errors="replace")
        try:
            with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as log, \
                    _Bar(label, progress or TqdmInLog(log_path), terminal, leave=False):
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {label}\n")
                log.flush()
                for fd in (1, 2):
                    os.dup2(log.fileno(), fd)
                # sys.stdout / sys.stderr too, for when they are not the streams on fds 1 and 2
                try:
                    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                        yield
                except BaseException:
                    traceback.print_exc(file=log)  # into the log, where the tail shows it
                    raise
                finally:
                    _flush()
                    for fd in (1, 2):
                        os.dup2(saved[fd], fd)
        except BaseException:
            self.show_tail(log_path)
            raise
        finally:
            terminal.close()
            for fd in saved.values():
                os.close(fd)

    def show_tail(self, log_path: str) -> None:
        sys.stderr.write(f"--- last {TAIL_LINES} lines of {log_path} ---\n{tail(log_path)}\n--- end of log ---\n")
        sys.stderr.flush()


def tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log, each as a terminal would show it (a tqdm line's last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read the log: {e})"
    shown = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    while shown and not shown[-1].strip():
        shown.pop()
    return "\n".join(shown[-lines:])


def seconds(wall: float) -> str:
    return f"{wall:.1f} s" if wall < 120 else f"{wall / 60:.1f} min"


def stage_summary(metrics: dict[str, Any]) -> str:
    """The key results of a finished stage for its closing line."""
    parts = []
    if isinstance(metrics.get("train_loss"), (int, float)):
        parts.append(f"train_loss {metrics['train_loss']:.4f}")
    ogpsa = metrics.get("ogpsa") or {}
    if "rebuilds" in ogpsa:
        parts.append(f"rebuilds {ogpsa['rebuilds']}")
    if isinstance(ogpsa.get("mean_removed_fraction"), (int, float)):
        parts.append(f"mean removed fraction {ogpsa['mean_removed_fraction']:.4f}")
    return ", ".join(parts)


def eval_summary(result: dict[str, Any]) -> str:
    """The key numbers of an evaluation for its closing line."""
    metrics = result.get("metrics") or {}
    keys = [k for k in EVAL_KEYS if k in metrics] or sorted(metrics)[:4]
    return ", ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys)


class _Bar:
    """One tqdm bar for `stream`, moved by a thread that polls `progress` until the block ends.

    A terminal gets a live bar (kept at the end with `leave`). A file or a pipe (CI, a test), where
    a carriage return does not rewrite the line, gets the bar's state as a plain line every
    `SNAPSHOT_SECONDS` and, with `leave`, its last state."""

    def __init__(self, label: str, progress: Progress, stream, leave: bool):
        self.label, self.progress, self.stream, self.leave = label, progress, stream, leave
        self.stop = threading.Event()

    def __enter__(self) -> "_Bar":
        from tqdm import tqdm

        self.tty = _isatty(self.stream)
        self.bar = tqdm(desc=self.label, file=self.stream if self.tty else _Discard(), total=None, leave=self.leave,
                        dynamic_ncols=self.tty, mininterval=POLL_SECONDS, bar_format=_format(None))
        self.snapshot_at = time.monotonic() + SNAPSHOT_SECONDS
        self.thread = threading.Thread(target=self._loop, name=f"ogpsa-bar-{self.label}", daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            self._update()
            if not self.tty and time.monotonic() >= self.snapshot_at:
                self._snapshot()

    def _update(self) -> None:
        try:
            done, total, note = self.progress.poll()
        except Exception:  # a display only: never let it stop the run
            return
        if total != self.bar.total:
            self.bar.reset(total=total)
            self.bar.bar_format = _format(total)
        self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(done - self.bar.n)

    def _snapshot(self) -> None:
        self.snapshot_at = time.monotonic() + SNAPSHOT_SECONDS
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{self.bar}\n")
            self.stream.flush()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        if self.tty:
            self.bar.refresh()
        elif self.leave:
            self._snapshot()
        self.bar.close()


class _Discard:
    """Where a bar draws when its stream is not a terminal (its states are written as lines)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _format(total: int | None) -> str:
    if total is None:
        return "{desc}: {elapsed}{postfix}"
    return "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


__all__ = ["Console", "Progress", "TrainerSteps", "TqdmInLog", "tail", "seconds", "stage_summary", "eval_summary",
           "TAIL_LINES"]
