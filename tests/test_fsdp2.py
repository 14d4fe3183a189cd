"""FSDP2: the sharded basis, projection and update target against the whole-tensor (DDP) path.

accelerate turns FSDP on only on accelerators (on CPU, `fsdp:` in a LLaMA-Factory YAML silently
trains with DDP), so this check drives torch's own `fully_shard` on 2 CPU processes (gloo)
directly: `tests/fsdp2_worker.py` builds both bases from the same reference samples (with an
uneven split, so one rank runs a weight-0 top-up micro-batch) and projects the same gradient and
the same step. The end-to-end FSDP2 run through `llamafactory-cli` needs a GPU machine.
"""

import pytest
from helpers import run_worker

pytestmark = pytest.mark.multiprocess


def test_fsdp2_pieces_match_whole_tensors(tiny, tmp_path):
    r = run_worker("fsdp2_worker.py", tiny["model"], cwd=tmp_path)
    print(r)
    assert r["engine"] == "fsdp2" and r["ranks"][0] == r["ranks"][1] == 3
    assert r["rows"] < 1e-5  # every rank's rows are the matching slices of the whole basis
    assert r["grads"] < 1e-6 and r["weights"] < 1e-6
    assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5)
    # the reference gradients' norms (logged as grad_norm/<set>) and coordinates: FSDP2 averages its
    # reduce-scatter over the ranks, and the rows are scaled back to the sum
    assert r["ref_norms"][1] == pytest.approx(r["ref_norms"][0], rel=1e-5)
    assert r["coords"][1] == pytest.approx(r["coords"][0], rel=1e-5)
    assert r["removed_fraction"][0] == pytest.approx(r["removed_fraction"][1], rel=1e-4)
    assert r["cosines"][0] == pytest.approx(r["cosines"][1], rel=1e-4, abs=1e-6)
    assert r["in_span"][0] == pytest.approx(r["in_span"][1], rel=1e-4) and r["in_span"][0] > 0
    whole, local, total = r["basis_bytes"]
    assert total == whole and abs(local - whole / 2) <= 0.05 * whole  # 1/world of the basis per rank


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_fsdp2_null_space_equals_the_whole_tensor_run(tiny, tmp_path, tuning):
    """The null space under FSDP2: each rank projects its own rows of every weight (or LoRA A), its
    gradient and its step with the replicated null spaces; the covariances are summed over the
    ranks' reference tokens. Null dimensions, weights and logged norms equal the DDP-style run, through
    a rebuild (under LoRA with B moved) too."""
    r = run_worker("fsdp2_null_worker.py", tiny["model"], tuning, cwd=tmp_path)
    print({k: v for k, v in r.items() if k != "build"})
    assert r["engine"] == ["ddp", "fsdp2"]
    whole, shard = r["build"]
    assert whole == shard and 0 < whole["null_dims"]  # same tokens, same null dimension per layer
    assert r["projector"] < 1e-5
    assert r["weights"] < 1e-5 * max(r["moved"], 1e-3) + 1e-6 and r["moved"] > 1e-3
    if tuning == "lora":  # A <- A P at the build: the norm removed over all ranks' rows of A
        assert r["lora_a_moved"][1] == pytest.approx(r["lora_a_moved"][0], rel=1e-5) and r["lora_a_moved"][0] > 0
        # the rebuild with B moved: the same trained layers and free directions of B (from the gathered A)
        assert whole["rebuild"]["lora_trained_layers"] > 0 and whole["rebuild"]["lora_b_free_dims"] > 0
    for a, b in zip(*r["records"]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["removed_fraction"] == pytest.approx(a["removed_fraction"], rel=1e-4, abs=1e-7)
