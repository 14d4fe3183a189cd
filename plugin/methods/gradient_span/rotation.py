"""ogpsa_reference_rotation: each rebuild reads a 1/m share of every reference set, in turn.

Share s of a set holds its samples s, s + m, s + 2m, ... of the longest-first order (`reference`
keeps the sets sorted), so the shares are alike in length and the same on every rank and at every
rebuild; with ogpsa_directions_per_set r each share is further split into r groups
(`reference.split_groups`). Share s of set "x" is named "x@s", its group g "x@s#g".

The subspace holds every share's latest gradient: m x sets x r directions, orthonormalised
together. A rebuild that rotates reads the share whose turn it is, and keeps the other shares'
gradients from the basis itself (`maths.gradients_of`: each is its coordinates times the rows), so
the whole set is covered every m rebuilds and each rebuild costs 1/m of a full one. A build with no
basis to rotate (the first of a stage, a resume without a saved state, LoRA's follow-up) reads
every share.
"""

from __future__ import annotations

from ...reference import ReferenceDataError, ReferenceSet, split_groups

SHARE = "@"


def shares(refs: list[ReferenceSet], m: int, r: int) -> list[list[ReferenceSet]]:
    """Per share s (m of them), the reference gradients' sources it holds: every set's share s, or its r
    groups. m = 1: one share, the sets (or their groups) exactly as without rotation."""
    if m == 1:
        return [split_groups(refs, r)]
    for ref in refs:
        if len(ref) < m * r:
            raise ReferenceDataError(
                f"ogpsa_reference_rotation: reference set {ref.name!r} has {len(ref)} usable samples, fewer than "
                f"the {m} shares x {r} directions per set asked for"
            )
    return [split_groups([ReferenceSet(f"{ref.name}{SHARE}{s}", ref.features[s::m]) for ref in refs], r)
            for s in range(m)]


def share_of(name: str) -> int:
    """The share a source's name ("x@s" or "x@s#g") belongs to."""
    return int(name.rpartition(SHARE)[2].split("#")[0])
