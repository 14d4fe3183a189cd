"""The projection's state inside a trainer checkpoint, so that a resumed run continues the
uninterrupted one instead of rebuilding the subspace at the resume step.

One file per data-parallel rank, `<checkpoint>/ogpsa/rank<r>-of-<W>.pt`: under ZeRO and FSDP2 each
rank holds only its piece of the basis, and the pieces are only valid for the same world size,
engine and partition. What a file holds (`payload` in the callback) is checked against the
running job before it is used; any mismatch, on any rank, means a fresh rebuild on every rank
(the ranks must agree, or the next collective would hang).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

FORMAT = 1
FOLDER = "ogpsa"


def state_path(checkpoint_dir: str, rank: int, world_size: int) -> str:
    return os.path.join(checkpoint_dir, FOLDER, f"rank{rank}-of-{world_size}.pt")


def save(checkpoint_dir: str, rank: int, world_size: int, payload: dict[str, Any]) -> str:
    """Write this rank's state under a temporary name, then rename (a killed save leaves no file)."""
    path = state_path(checkpoint_dir, rank, world_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load(checkpoint_dir: str, rank: int, world_size: int, device, expected: dict[str, Any]) -> tuple[Optional[dict], str]:
    """This rank's saved state if it exists and every key of `expected` matches, else (None, why)."""
    path = state_path(checkpoint_dir, rank, world_size)
    if not os.path.isfile(path):
        return None, f"no {os.path.relpath(path, checkpoint_dir)} in {checkpoint_dir}"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail the resume
        return None, f"{path} cannot be read ({type(err).__name__}: {err})"
    if state.get("format") != FORMAT:
        return None, f"{path} has format {state.get('format')!r}, expected {FORMAT}"
    for key, value in expected.items():
        if state.get(key) != value:
            return None, f"{path} was saved with {key}={state.get(key)!r}, this run has {value!r}"
    return state, ""

