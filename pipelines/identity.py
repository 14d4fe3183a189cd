"""What a pipeline result depends on, down to the bytes of its data: the runner's reuse test.

A stage's *training identity* covers its LLaMA-Factory arguments, its starting model, the identity
of the stage before it, and its inputs: for every dataset named in `dataset`, `eval_dataset` and
(OGPSA stages) `ogpsa_reference`, the `dataset_info.json` entry and the content of the file or
folder it points to. The *evaluation identity* covers the recipe's `eval:` block and the content
of every file that block reads. A Hub entry (`hf_hub_url`, ...) is covered by its entry only: its
content is not on this machine.

Files are read in 1 MiB chunks, so a data file of any size costs no memory, and they are hashed
again on every run: a cache keyed on size and modification time would miss an edit that keeps
both, and reusing a stale result is what this module exists to prevent.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ..plugin.files import dataset_names, is_hub_dir, read_dataset_info, short_hash
from .recipe import StageSpec

CHUNK = 1 << 20
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "cloud_file_name")


def file_sha256(path: str) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_digest(path: str) -> str | dict[str, str]:
    """A file's sha256; for a folder, {relative path: sha256} of every file under it; else 'missing'."""
    if os.path.isfile(path):
        return file_sha256(path)
    if not os.path.isdir(path):
        return "missing"
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = file_sha256(full)
    return out


def dataset_digests(dataset_dir: Any, names: list[str]) -> dict[str, Any]:
    """{name: {"entry": its dataset_info entry, "content": digest of what it points to}}."""
    if is_hub_dir(dataset_dir):
        return {name: {"entry": "remote", "dataset_dir": str(dataset_dir)} for name in names}
    info = read_dataset_info(dataset_dir)
    out = {}
    for name in names:
        entry = info.get(name)
        local = isinstance(entry, dict) and not any(k in entry for k in REMOTE_KEYS)
        where = (entry.get("file_name") or entry.get("script_url")) if local else None
        out[name] = {"entry": entry, "content": path_digest(os.path.join(dataset_dir, where)) if where else "remote"}
    return out


def stage_inputs(spec: StageSpec) -> dict[str, Any]:
    """Digests of every dataset the stage reads (training data, eval data, reference sets)."""
    args = spec.args
    names = [n for key in ("dataset", "eval_dataset", "ogpsa_reference") for n in dataset_names(args.get(key))]
    return dataset_digests(args.get("dataset_dir", "data"), sorted(set(names)))


def stage_identity(spec: StageSpec, start_model: str, previous: str, inputs: dict[str, Any]) -> str:
    """Identity of a stage run: arguments, starting model, the chain before it and its inputs' content."""
    return short_hash({"args": spec.args, "start": start_model, "prev": previous, "inputs": inputs})


def eval_identity(block: dict[str, Any] | None, model: str = "") -> str:
    """Identity of an evaluation: the `eval:` block, the content of the files it reads, and `model`."""
    return short_hash({"eval": block, "files": eval_files(block or {}), "model": model})


def eval_files(block: dict[str, Any]) -> dict[str, Any]:
    """Digest of each file or dataset an `eval:` block names (resolved as ogpsa.pipelines.evaluate does)."""
    sources = []
    for key in ("capability", "exclude"):
        value = block.get(key) or []
        sources += dataset_names(value)
    sources += [str(block[k]) for k in ("harmful", "benign") if block.get(k)]
    out: dict[str, Any] = {src: _eval_source(src, block.get("dataset_dir")) for src in sources}
    for key in ("hhh", "lm_eval_include_path"):
        if block.get(key):
            out[f"{key}:{block[key]}"] = path_digest(os.path.expanduser(str(block[key])))
    return out


def _eval_source(src: str, dataset_dir: str | None) -> Any:
    """A file path, or a dataset name in `dataset_dir`; `LABEL=SRC` names a source."""
    if "=" in src and not os.path.exists(src):
        src = src.split("=", 1)[1].strip()
    path = os.path.expanduser(src)
    if os.path.isfile(path) or not dataset_dir:
        return path_digest(path)
    try:
        return dataset_digests(dataset_dir, [src])[src]
    except (OSError, ValueError):
        return "missing"  # the evaluation itself reports this with its own message
