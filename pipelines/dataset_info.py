"""The run's `dataset_info.json`, read in one place for the pipelines (recipe checks, identities,
evaluation), and the dataset-name lists of LLaMA-Factory's arguments.

A `dataset_dir` of `ONLINE` or `REMOTE:<repo>` has no local file: LLaMA-Factory resolves it
against the Hub at run time, so `read_dataset_info` returns None for it and each caller decides
what that means (skip a check, hash the entry only, refuse a name).
"""

from __future__ import annotations

import json
import os
from typing import Any

INFO_FILE = "dataset_info.json"


class DatasetInfoError(ValueError):
    """A local dataset_info.json that is missing (`missing`) or not valid JSON; the message names it."""

    def __init__(self, path: str, reason: str, missing: bool):
        super().__init__(f"{path} {reason}")
        self.path, self.reason, self.missing = path, reason, missing


def is_hub_dir(dataset_dir: Any) -> bool:
    """True for a dataset_dir that LLaMA-Factory resolves against the Hub (no local file)."""
    return not isinstance(dataset_dir, str) or dataset_dir == "ONLINE" or dataset_dir.startswith("REMOTE:")


def info_path(dataset_dir: str | os.PathLike) -> str:
    return os.path.join(dataset_dir, INFO_FILE)


def read_dataset_info(dataset_dir: Any) -> dict | None:
    """The parsed dataset_info.json of `dataset_dir`; None for a Hub dataset_dir."""
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
