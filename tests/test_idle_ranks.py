"""A rank with no reference batch still takes part in every collective of a rebuild (`-m multiprocess`).

One reference sample per set and 2 processes: `plan_batches` deals each set's only micro-batch to
rank 0, so rank 1 runs no forward or backward for it. Under ZeRO-1/2, and under DDP with a basis
dtype other than the weights', rank 1's `.grad` stays None; it must still all-reduce a gradient of
the right shape, or the ranks' collectives pair with the wrong tensors (a hang, an error or a
corrupt basis). Each 2-process run must finish, and the basis it saved (the ranks' pieces side by
side under ZeRO) must equal the basis one process builds from the same sample.
"""

import pytest
import torch
from helpers import TORCHRUN, base_config, deepspeed_config, null_keys, ogpsa_keys, ogpsa_log, run_cli

pytestmark = pytest.mark.multiprocess

ONE_SAMPLE = {"ogpsa_reference_samples": 1, "ogpsa_refresh_steps": 0}


def run(tiny, root, label, nproc, keys, deepspeed=None, max_steps=1):
    out = root / f"{label}_{nproc}"
    if (out / "trainer_state.json").exists():  # the one-process baselines are shared
        return out
    cfg = base_config(tiny, out, per_device_train_batch_size=4 // nproc, max_samples=4, max_steps=max_steps,
                      optim="sgd", learning_rate=0.05, save_strategy="steps", save_steps=1, **keys)
    if nproc == 2:
        # a rank stuck in a collective fails after ddp_timeout instead of waiting for run_cli's limit
        cfg.update(ddp_backend="gloo", ddp_timeout=180)
    if deepspeed:
        cfg["deepspeed"] = deepspeed
    run_cli(cfg, root / f"run_{label}_{nproc}", env=TORCHRUN if nproc == 2 else None)
    return out


def saved_basis(out, world: int) -> dict:
    """The basis of checkpoint-1: each parameter's rows, with the ranks' pieces side by side when sharded."""
    paths = [out / "checkpoint-1" / "ogpsa" / f"rank{r}-of-{world}.pt" for r in range(world)]
    paths.append(out / "checkpoint-1" / "ogpsa" / "replicated.pt")  # one process, DDP: rank 0's one copy
    files = [torch.load(p, weights_only=True) for p in paths if p.exists()]
    if len(files) == 1:
        return files[0]["basis"]
    bases = [f["basis"] for f in files]
    directions = [torch.cat([b["directions"][i] for b in bases], dim=1) for i in range(len(bases[0]["directions"]))]
    for b in bases[1:]:  # the coordinates and norms are global: every rank holds the same
        assert all(torch.equal(x, y) for x, y in zip(b["coords"], bases[0]["coords"]))
        assert torch.equal(b["ref_norms"], bases[0]["ref_norms"])
    return {**bases[0], "directions": directions}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("idle")


@pytest.mark.parametrize("engine", ["ddp_bf16_basis", "zero1", "zero2"])
def test_idle_rank_builds_the_one_process_basis(tiny, root, tmp_path_factory, engine):
    import json

    # a second rebuild after the first step: the engine has stepped, and must hold nothing pending after it
    keys = ogpsa_keys(**{**ONE_SAMPLE, "ogpsa_refresh_steps": 1})
    deepspeed = None
    if engine == "ddp_bf16_basis":  # fp32 weights, bf16 rows: the gradient is copied, not accumulated in place
        keys["ogpsa_basis_dtype"] = "bfloat16"
    else:
        path = tmp_path_factory.mktemp("ds") / f"{engine}.json"
        path.write_text(json.dumps(deepspeed_config(int(engine[-1]))))
        deepspeed = str(path)
    label = "bf16" if engine == "ddp_bf16_basis" else "auto"
    one_out = run(tiny, root, label, 1, keys, max_steps=2)
    one = saved_basis(one_out, 1)  # checkpoint-1: the step-0 basis
    two_out = run(tiny, root, engine, 2, keys, deepspeed, max_steps=2)
    pieces = sorted(p.name for p in (two_out / "checkpoint-1" / "ogpsa").iterdir())
    two = saved_basis(two_out, 2)
    assert pieces == (["replicated.pt"] if engine.startswith("ddp") else ["rank0-of-2.pt", "rank1-of-2.pt"])
    rebuilds = [r for r in ogpsa_log(two_out) if r.get("event") == "rebuild"]
    assert [r["step"] for r in rebuilds] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_spread"] == 0.0 for r in rebuilds)
    # step 1 also keeps the step-0 directions (ogpsa_keep_previous): its collectives run on idle ranks too
    one_rebuilds = [r for r in ogpsa_log(one_out) if r.get("event") == "rebuild"]
    assert rebuilds[0]["rank"] == 3 and rebuilds[1]["kept_directions"] > 0
    assert [(r["rank"], r["kept_directions"] if "kept_directions" in r else None) for r in rebuilds] == \
        [(r["rank"], r["kept_directions"] if "kept_directions" in r else None) for r in one_rebuilds]
    # the same directions, coordinates and norms as one process (ZeRO: reduction order only)
    assert [d.dtype for d in two["directions"]] == [d.dtype for d in one["directions"]]
    gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(one["directions"], two["directions"]))
    coords = max(float((a - b).abs().max()) for a, b in zip(one["coords"], two["coords"]))
    print(f"{engine}: rows {gap:.2e}, coordinates {coords:.2e}, norms {one['ref_norms'].tolist()} "
          f"vs {two['ref_norms'].tolist()}")
    assert gap <= (0.0 if engine.startswith("ddp") else 1e-5)
    assert torch.allclose(one["ref_norms"], two["ref_norms"], rtol=1e-5, atol=0)
    assert coords <= 1e-5 * float(one["ref_norms"].max())


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_idle_rank_null_space_matches_one_process(tiny, root, tmp_path_factory, engine):
    """The null-space rebuild (forward only, covariances summed) with an idle rank, under DDP and
    under ZeRO-3 (whose forward gathers parameters: the idle rank runs weight-0 top-up forwards)."""
    import json

    keys = null_keys(**ONE_SAMPLE)
    deepspeed = None
    if engine == "zero3":
        path = tmp_path_factory.mktemp("ds") / "null_zero3.json"
        path.write_text(json.dumps(deepspeed_config(3)))
        deepspeed = str(path)
    one = next(r for r in ogpsa_log(run(tiny, root, "null", 1, keys)) if r.get("event") == "rebuild")
    two = next(r for r in ogpsa_log(run(tiny, root, f"null_{engine}", 2, keys, deepspeed))
               if r.get("event") == "rebuild")
    assert two["world_size"] == 2 and two["engine"] == engine
    for key, value in one.items():
        if key.startswith("padded_tokens/") and engine == "zero3":  # the idle rank's top-up forwards count
            assert two[key] > value, key
        elif key.startswith(("null_dim/", "input_tokens/", "padded_tokens/")):
            assert two[key] == value, key
        elif key.startswith("null_energy/"):
            assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
