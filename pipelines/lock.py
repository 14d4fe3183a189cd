"""One runner per pipeline folder: `<output_dir>/pipeline.lock` names the holder's pid and host.

A second runner on the same folder stops with exit code 2 while the holder runs. A lock whose
holder is gone (same host, pid no longer running: a SIGKILL, a power cut) is stale and is taken
over with a warning. A lock written on another host cannot be checked from here, so it is never
taken over: the message says to remove the file once that run is known to be gone.

Two runners that find the same stale lock must not both take it over, so every look at the lock
happens under an exclusive `flock` on the pipeline folder itself (held for milliseconds; the
kernel drops it if the process dies; NFS, which refuses it, goes without). The lock file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid

from .recipe import RecipeError

LOCK_FILE = "pipeline.lock"


class PipelineLocked(RecipeError):
    """Another runner holds the pipeline folder; the message names the lock file and the holder."""


@contextlib.contextmanager
def _folder_guard(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # NFS refuses flock on a folder opened read-only: go on, as without the guard
        yield
    finally:
        os.close(fd)  # releases the flock


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a lock naming us before we took it was left by an earlier process with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class PipelineLock:
    """`with PipelineLock(folder):` holds the folder's lock for the duration of the block."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}

    def __enter__(self) -> "PipelineLock":
        with _folder_guard(self.folder):
            holder = self._holder()
            if holder is not None:
                self._check_stale(holder)
            self._write()
        return self

    def __exit__(self, *exc) -> None:
        try:
            with _folder_guard(self.folder):
                holder = self._holder()
                if holder is not None and holder.get("token") == self.me["token"]:
                    os.unlink(self.path)
        except (FileNotFoundError, PipelineLocked):
            pass  # the folder was removed during the run, or the file is no longer ours: leave it

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0:
            raise PipelineLocked(f"{self.path}: unreadable lock file; remove it if no runner uses {self.folder}")
        return holder

    def _check_stale(self, holder: dict) -> None:
        """Return when the holder is gone (with a warning); raise while it may still run."""
        pid, host = holder["pid"], holder.get("host")
        if host == self.me["host"] and not _alive(pid):
            sys.stderr.write(f"ogpsa: warning: {self.path}: taking over a stale lock (pid {pid} on {host} "
                             "is not running)\n")
            return
        where = "" if host == self.me["host"] else " (another host: remove the file once that run is gone)"
        raise PipelineLocked(f"{self.path}: pipeline folder in use by pid {pid} on {host} since "
                             f"{holder.get('since', '?')}{where}")

    def _write(self) -> None:
        record = {**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = f"{self.path}.{self.me['token']}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, self.path)
