"""File and text helpers shared by the plugin and the pipelines (standard library only).

Atomic writes and folders (readers see the old file or the new one, never half of one), short content hashes,
the one reader of a run's `dataset_info.json`, comma-separated name lists and prompt normalisation.
Standard library only, so `ogpsa.data_prep` (which imports no training code) uses them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

INFO_FILE = "dataset_info.json"


def temp_file(folder: Path, name: str, blob: bytes) -> str:
    """`blob` in a new hidden temp file in `folder` (same file system as the target, so the rename is
    atomic), with the mode a plain `open(..., "w")` would give; returns its path."""
    umask = os.umask(0o022)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, path.name, data.encode("utf-8") if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON (keys sorted for a dict; a value JSON cannot hold, as its str), atomically."""
    text = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=isinstance(obj, dict), default=str) + "\n"
    return write_atomic(path, text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temp folder next to `target`; on success it replaces `target`, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def short_hash(obj: Any) -> str:
    """16 hex digits of the sha256 of `obj` as canonical JSON (a value JSON cannot hold, as its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DatasetInfoError(ValueError):
    """A local dataset_info.json that is missing (`missing`) or not valid JSON; the message names it."""

    def __init__(self, path: str, reason: str, missing: bool):
        super().__init__(f"{path} {reason}")
        self.path, self.reason, self.missing = path, reason, missing


def is_hub_dir(dataset_dir: Any) -> bool:
    """True for a dataset_dir that LLaMA-Factory resolves against the Hub at run time (`ONLINE`,
    `REMOTE:<repo>`): no local file, so `read_dataset_info` returns None and each caller decides
    what that means (skip a check, hash the entry only, refuse a name)."""
    return not isinstance(dataset_dir, str) or dataset_dir == "ONLINE" or dataset_dir.startswith("REMOTE:")


def info_path(dataset_dir: str | os.PathLike) -> str:
    return os.path.join(dataset_dir, INFO_FILE)


def read_dataset_info(dataset_dir: Any) -> dict | None:
    """The parsed dataset_info.json of `dataset_dir`; None for a Hub dataset_dir. The one reader of
    the registry: recipe checks, identities, probes, evaluation defaults and `preflight`."""
    if isinstance(dataset_dir, os.PathLike):
        dataset_dir = os.fspath(dataset_dir)
    if is_hub_dir(dataset_dir):
        return None
    path = info_path(dataset_dir)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetInfoError(path, "does not exist", missing=True) from None
    except json.JSONDecodeError as e:
        raise DatasetInfoError(path, f"is not valid JSON ({e})", missing=False) from None


def dataset_names(value: Any) -> list[str]:
    """The names of a `dataset` / `eval_dataset` / `ogpsa_reference` value (comma-separated or a list)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def norm_text(text: str) -> str:
    """Whitespace- and case-normalised key used for deduplication and disjointness."""
    return " ".join(text.split()).casefold()


def discard_if_created_empty(path: str | None, existed: bool) -> None:
    """After a failed start: remove `path` if this run created it (`existed` is False) and it is still
    empty, so a refused run leaves nothing behind."""
    if path and not existed and os.path.isdir(path) and not os.listdir(path):
        try:
            os.rmdir(path)
        except OSError:
            pass  # another rank got there first
