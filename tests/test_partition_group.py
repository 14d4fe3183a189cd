"""ZeRO partitioning within a data-parallel group narrower than the world is refused (`-m multiprocess`).

The projection's inner products and a rebuild's reference gradients are summed over the whole
world; with DeepSpeed's MiCS, expert groups, sequence or tensor parallelism a ZeRO rank partitions
within a smaller group, so those sums would count each piece once per replica. `detect` reads the
group sizes from the real ZeRO optimizer (`tests/partition_group_worker.py`, 2 processes, gloo).
The same engine also drives the check every rebuild ends with (no pending gradient reduction).
"""

import pytest
from helpers import run_worker

pytestmark = pytest.mark.multiprocess


def test_partition_group_narrower_than_the_world_is_refused(tiny, tmp_path):
    report = run_worker("partition_group_worker.py", tiny["model"], cwd=tmp_path)
    print(report)
    assert report["world"] == "ok: zero2"
    assert report["alone"] == ("refused: deepspeed: the optimizer partitions over process groups of 1 ranks, not all 2 "
                               "(MiCS, expert, sequence or tensor parallelism); OGPSA stages reduce over the whole "
                               "world and support plain data parallelism only")
    # the check run after every rebuild: silent when the hooks were taken out, loud when a backward
    # reached ZeRO's reduction (as a reference backward would under a DeepSpeed that reduces another way)
    assert report["pending_suspended"] == "none"
    assert report["pending_plain"].startswith("ogpsa: the zero2 engine holds a pending gradient reduction")
