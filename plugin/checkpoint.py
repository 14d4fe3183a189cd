"""The constraint's state inside a trainer checkpoint, so that a resumed run continues the
uninterrupted one instead of rebuilding the subspace at the resume step.

Two kinds of state, by the engine's layout (`sharding.py`):

- replicated (one process, DDP): every rank holds the same state; rank 0 writes one copy,
  `<checkpoint>/ogpsa/replicated.pt`, and a resume on any number of processes reads it.
- sharded (ZeRO-1/2/3, FSDP2): each rank holds its piece of the per-parameter tensors (the gradient
  span's basis rows, the null space's anchors) and writes `<checkpoint>/ogpsa/rank<r>-of-<W>.pt`,
  with the piece of every parameter it held (`pieces`). A resume under the same layout reads its
  own file; under another (another world size, another engine, or a replicated run) every rank
  reads all W files (memory-mapped: only the bytes of its new pieces are touched) and the
  constraint cuts its new pieces from them (`Constraint.reshard`).

What a file holds (`payload` in the callback) is checked against the running job before it is
used; a settings mismatch, on any rank, means a fresh rebuild on every rank (the ranks must agree,
or the next collective would hang). A sharded state that cannot be re-cut (files of an older
format, which do not record their pieces, or a rank's file missing) stops the run with the world
size and engine it needs.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

FORMAT = 2  # 2: replicated.pt, and `pieces` in every file; 1: rank<r>-of-<W>.pt only, no pieces
READABLE = (1, 2)
FOLDER = "ogpsa"
REPLICATED = "replicated.pt"
# what describes where a state lives rather than which state it is: not part of the settings match
LAYOUT_KEYS = ("world_size", "engine", "pieces", "full_numels")


def state_path(checkpoint_dir: str, rank: int, world_size: int, replicated: bool = False) -> str:
    name = REPLICATED if replicated else f"rank{rank}-of-{world_size}.pt"
    return os.path.join(checkpoint_dir, FOLDER, name)


def save(checkpoint_dir: str, rank: int, world_size: int, payload: dict[str, Any], replicated: bool = False) -> str:
    """Write this rank's state under a temporary name, then rename (a killed save leaves no file)."""
    path = state_path(checkpoint_dir, rank, world_size, replicated)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


@dataclass
class Saved:
    """The state files of one checkpoint: one replicated copy, or W ranks' pieces (index = rank)."""

    paths: list[str]
    world_size: int
    replicated: bool

    def describe(self) -> str:
        return "one replicated copy" if self.replicated else f"{self.world_size} ranks' pieces"


def find(checkpoint_dir: str) -> Optional[Saved]:
    """What state files `checkpoint_dir` holds (None: none). A format-1 run wrote a replicated state as
    `rank0-of-W.pt` alone; it is returned as sharded here and recognised by its engine on load."""
    folder = os.path.join(checkpoint_dir, FOLDER)
    if os.path.isfile(os.path.join(folder, REPLICATED)):
        return Saved([os.path.join(folder, REPLICATED)], 1, True)
    ranks: dict[int, dict[int, str]] = {}
    for path in glob.glob(os.path.join(folder, "rank*-of-*.pt")):
        match = re.fullmatch(r"rank(\d+)-of-(\d+)\.pt", os.path.basename(path))
        if match:
            ranks.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not ranks:
        return None
    world = max(ranks)  # one world size per checkpoint; the largest if a folder was reused
    held = ranks[world]
    return Saved([held.get(r, "") for r in range(world)], world, False)


def read(path: str, device, mmap: bool = False) -> tuple[Optional[dict], str]:
    """One state file (None, why: missing, unreadable or of an unknown format). mmap: leave the
    tensors on disk until touched (a re-cut reads only the bytes of its new pieces)."""
    if not path or not os.path.isfile(path):
        return None, f"no {path or 'file'}"
    try:
        if mmap:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail the resume
        return None, f"{path} cannot be read ({type(err).__name__}: {err})"
    if state.get("format") not in READABLE:
        return None, f"{path} has format {state.get('format')!r}, expected one of {READABLE}"
    return state, ""


def mismatch(state: dict, expected: dict[str, Any], path: str) -> str:
    """Why `state` was saved under other settings than `expected` ('' when it matches)."""
    for key, value in expected.items():
        if state.get(key) != value:
            return f"{path} was saved with {key}={state.get(key)!r}, this run has {value!r}"
    return ""


def cut(parts: list[tuple[int, int, torch.Tensor]], start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of a flattened parameter, along the last dim, from the saved pieces that
    cover them: `parts` holds (piece start, piece stop, tensor whose last dim is that piece)."""
    out = []
    for a, b, t in sorted(parts, key=lambda p: p[0]):
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            out.append(t[..., lo - a : hi - a])
    got = sum(t.shape[-1] for t in out)
    if got != stop - start:
        raise ValueError(f"the saved pieces cover {got} of elements [{start}, {stop})")
    if not out:
        return parts[0][2][..., :0] if parts else torch.zeros(0)
    return torch.cat(out, dim=-1)
