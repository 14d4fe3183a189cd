"""Shared pieces of the data-preparation commands: reading sources, checking fields, writing outputs.

Sources are either local files (`.jsonl`, `.json`, `.parquet`, or a folder holding them, read in
sorted path order) or a Hugging Face Hub id written `OWNER/NAME[:CONFIG][@SPLIT]`, loaded with
`datasets.load_dataset`. Every problem with the input raises `DataPrepError` with a one-line
message naming the file (or Hub id), the row and the column; `ogpsa data` prints it and exits 2.

Outputs are written as a group: everything is computed in memory first, existing files are checked
for conflicts, then each file goes to a temporary name in DIR and is renamed into place. JSON is
canonical (sorted keys, indent 1, fixed separators, UTF-8, trailing newline) so the same source and
seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# stdlib-only helpers shared with the training side, re-exported for this package's modules
from ..plugin.files import atomic_dir, norm_text, temp_file, write_atomic, write_json_atomic  # noqa: F401

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataPrepError(Exception):
    """Bad input or a refused write; the message is one line naming the file and the column."""


@dataclass(frozen=True)
class Record:
    """One input row with where it came from (for error messages and provenance)."""

    where: str  # file path or Hub id
    index: int  # 1-based line (jsonl) or 0-based position (json list, parquet, Hub split)
    data: dict[str, Any]

    def at(self) -> str:
        """`file: row N` prefix for messages."""
        return f"{self.where}: row {self.index}"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, indent 1, fixed separators, UTF-8, final newline."""
    text = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True, separators=(",", ": "))
    return (text + "\n").encode("utf-8")


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"ogpsa data: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Reading


def is_hub_id(source: str) -> bool:
    """True when `source` is not a local path and looks like `OWNER/NAME[:CONFIG][@SPLIT]`."""
    if Path(source).exists():
        return False
    base = source.split("@", 1)[0].split(":", 1)[0]
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not base.endswith(LOCAL_SUFFIXES) and not source.startswith((".", "/"))


def parse_hub_spec(source: str, config: str | None, split: str) -> tuple[str, str | None, str]:
    """Split `OWNER/NAME[:CONFIG][@SPLIT]` into (id, config, split), with the given defaults."""
    rest, _, at_split = source.partition("@")
    hub_id, _, at_config = rest.partition(":")
    return hub_id, (at_config or config), (at_split or split)


def load_hub(source: str, config: str | None, split: str) -> list[Record]:
    """Rows of one Hub split via `datasets.load_dataset`; unreachable Hub -> DataPrepError."""
    hub_id, config, split = parse_hub_spec(source, config, split)
    where = f"{hub_id}:{config}@{split}" if config else f"{hub_id}@{split}"
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo/config/split: all input errors here
        detail = " ".join(str(exc).split())[:200]
        raise DataPrepError(
            f"{source}: cannot load from the Hugging Face Hub ({where}): "
            f"{type(exc).__name__}: {detail}; no local path of that name either; offline? pass local "
            ".parquet/.jsonl/.json files or a folder instead"
        ) from None
    return [Record(where, i, dict(row)) for i, row in enumerate(ds)]


def local_files(source: str) -> list[Path]:
    """The readable files of a local source: the file itself or a folder's files in sorted order."""
    path = Path(source)
    if not path.exists():
        raise DataPrepError(f"{source}: no such file or folder (and not a Hub id OWNER/NAME)")
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataPrepError(f"{source}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataPrepError(f"{source}: folder holds no .jsonl, .json or .parquet file")
    return files


def _read_jsonl(path: Path) -> list[Record]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataPrepError(f"{path}: line {line_no}: invalid JSON ({exc.msg})") from None
            rows.append(Record(str(path), line_no, obj))
    return rows


def _read_json(path: Path) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(obj, dict) and "examples" in obj:  # BIG-bench task.json
        obj = obj["examples"]
    if not isinstance(obj, list):
        raise DataPrepError(f"{path}: expected a JSON list of objects or a BIG-bench task with 'examples'")
    return [Record(str(path), i, row) for i, row in enumerate(obj)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataPrepError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    return [Record(str(path), i, row) for i, row in enumerate(rows)]


def read_local(source: str) -> list[Record]:
    """All rows of a local file or folder; every row must be a JSON object."""
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    records: list[Record] = []
    for path in local_files(source):
        try:
            rows = readers[path.suffix](path)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataPrepError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
        for rec in rows:
            if not isinstance(rec.data, dict):
                raise DataPrepError(f"{rec.at()}: expected an object with named columns, got {type(rec.data).__name__}")
        records.extend(rows)
    return records


def read_source(source: str, config: str | None = None, split: str = "train") -> list[Record]:
    """Rows of a local source or a Hub id; an empty source is an error."""
    records = load_hub(source, config, split) if is_hub_id(source) else read_local(source)
    if not records:
        raise DataPrepError(f"{source}: source holds no rows")
    return records


def field(rec: Record, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """`rec.data[key]` checked against `kind`; missing/None is allowed only when `optional`."""
    value = rec.data.get(key)
    if value is None:
        if optional:
            return None
        raise DataPrepError(f"{rec.at()}: missing column '{key}'")
    bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if bad_bool or not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataPrepError(f"{rec.at()}: column '{key}' should be {names}, got {type(value).__name__} {value!r:.40}")
    return value


# ----------------------------------------------------------------------------------------------
# Writing


def sft_info(name: str) -> dict[str, Any]:
    """dataset_info.json entry of an Alpaca-format SFT set."""
    return {"file_name": f"{name}.json"}


def ranking_info(name: str) -> dict[str, Any]:
    """dataset_info.json entry of an Alpaca-format preference (DPO) set."""
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    return {"file_name": f"{name}.json", "ranking": True, "columns": columns}


def merged_info(out: Path, entries: dict[str, dict[str, Any]], overwrite: bool) -> dict[str, Any]:
    """Existing `out/dataset_info.json` plus `entries`; a different same-named entry needs `overwrite`."""
    path = out / "dataset_info.json"
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataPrepError(f"{path}: cannot read existing dataset registry ({type(exc).__name__})") from None
        if not isinstance(info, dict):
            raise DataPrepError(f"{path}: existing dataset registry is not a JSON object")
    for name, entry in entries.items():
        if name in info and info[name] != entry and not overwrite:
            raise DataPrepError(f"{path}: entry '{name}' exists with different content; pass --overwrite to replace it")
        info[name] = entry
    return info


def file_summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Size and checksum of one output set, for the stats file."""
    return {"file_name": f"{name}.json", "rows": len(rows), "sha256": hashlib.sha256(canonical_json(rows)).hexdigest()}


def write_outputs(
    out: Path,
    datasets: dict[str, list[dict[str, Any]]],
    entries: dict[str, dict[str, Any]],
    stats_name: str,
    stats: dict[str, Any],
    overwrite: bool,
) -> list[Path]:
    """Write the data files, the stats file and the merged registry, all or nothing."""
    blobs = {f"{name}.json": canonical_json(rows) for name, rows in datasets.items()}
    blobs[stats_name] = canonical_json(stats)
    blobs["dataset_info.json"] = canonical_json(merged_info(out, entries, overwrite))
    for file_name, blob in blobs.items():
        target = out / file_name
        if file_name != "dataset_info.json" and target.exists() and not overwrite and target.read_bytes() != blob:
            raise DataPrepError(f"{target}: exists with different content; pass --overwrite to replace it")
    return _write_all(out, blobs)


def _write_all(out: Path, blobs: dict[str, bytes]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for file_name, blob in blobs.items():
            temps[file_name] = temp_file(out, file_name, blob)
        for file_name, tmp in temps.items():  # registry last: it only names files already in place
            os.replace(tmp, out / file_name)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [out / name for name in blobs]
