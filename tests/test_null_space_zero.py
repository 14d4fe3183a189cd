"""The null space under DeepSpeed ZeRO-2/3: 2 processes (gloo, CPU) against the DDP null-space run.

Stock `llamafactory-cli train` with `FORCE_TORCHRUN=1 NPROC_PER_NODE=2` and a `deepspeed:` config, the
global batch of tests/test_scaleout.py (8 samples, 2 per process and micro-batch, 2 accumulation
steps, clipping, plain SGD). ZeRO's flat partitions cut rows anywhere: each rank projects the rows it
holds whole, and the rows a partition boundary cuts are summed over the ranks, projected whole by every
rank, and each rank takes its part back (`maths.RowCut`). The weights must equal the DDP run's to
float32 reduction-order noise, full fine-tuning and LoRA. Slow: `pytest -m multiprocess`.
"""

import json

import pytest
import torch
from helpers import TORCHRUN, base_config, deepspeed_config, load_state, null_keys, ogpsa_log, run_cli

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("null_zero")


def train(tiny, root, engine, tuning, label="null", **keys):
    out = root / f"{engine}_{tuning}_{label}"
    if (out / "trainer_state.json").exists():  # the DDP baselines are shared by the engines
        return out
    cfg = base_config(tiny, out, **{
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_samples": 8, "max_steps": 2,
        "optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 1.0, "ddp_backend": "gloo", **keys})
    if tuning == "lora":
        # rank 3: ZeRO-3 cuts each 3 x 64 A at element 96, inside its second row (a cut row)
        cfg.update({"finetuning_type": "lora", "lora_target": "all", "lora_rank": 3, "learning_rate": 0.5})
    if engine != "ddp":
        path = root / f"{engine}.json"
        path.write_text(json.dumps(deepspeed_config(int(engine[-1]))))
        cfg["deepspeed"] = str(path)
    run_cli(cfg, root / f"run_{engine}_{tuning}_{label}", env=TORCHRUN)
    return out


def weights(out):
    from safetensors.torch import load_file

    adapter = out / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.exists() else load_state(out)


def gap(a, b):
    keys = set(a) & set(b)  # ZeRO-1/2 also save the tied lm_head
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


# ZeRO-1 partitions the optimizer state as ZeRO-2 partitions the gradients too: the same flat pieces, so
# one case of it (full) checks that its step hook reaches them
# ZeRO-2 LoRA is `slow` (pytest -m slow): ZeRO-3 LoRA covers the LoRA path with cut rows, and CI's time is short
@pytest.mark.parametrize("engine, tuning", [("zero1", "full"), ("zero2", "full"),
                                            pytest.param("zero2", "lora", marks=pytest.mark.slow), ("zero3", "full"),
                                            ("zero3", "lora")])
def test_null_space_under_zero_matches_ddp(tiny, root, engine, tuning):
    keys = null_keys(ogpsa_null_layers="all_linear", ogpsa_refresh_steps=1)  # a rebuild at step 1 (LoRA: B moved)
    ddp, zero = train(tiny, root, "ddp", tuning, **keys), train(tiny, root, engine, tuning, **keys)
    plain = train(tiny, root, "ddp", tuning, "plain")
    w_ddp, w_zero, w_plain = weights(ddp), weights(zero), weights(plain)
    ulp = torch.finfo(torch.float32).eps * max(float(v.abs().max()) for v in w_ddp.values())
    difference, effect = gap(w_ddp, w_zero), gap(w_ddp, w_plain)
    builds = [r for r in ogpsa_log(zero) if r.get("event") == "rebuild"]
    ddp_builds = [r for r in ogpsa_log(ddp) if r.get("event") == "rebuild"]
    print(f"null space {engine} {tuning}: ddp-vs-engine {difference:.2e} (8 ulp {8 * ulp:.2e}), null-plain "
          f"{effect:.2e}, split rows {builds[0]['split_rows']}")
    assert difference <= 8 * ulp
    if engine == "zero3" and tuning == "lora":
        assert builds[0]["split_rows"] > 0
    assert effect > 1000 * 8 * ulp  # the projection itself is far above that noise
    assert [r["step"] for r in builds] == [0, 1] and all(r["engine"] == engine for r in builds)
    for a, b in zip(ddp_builds, builds):  # the same reference tokens, null dimensions, LoRA bookkeeping
        same = [k for k in a if k.startswith(("null_dim", "input_tokens/", "lora_"))]
        assert {k: b[k] for k in same} == pytest.approx({k: a[k] for k in same}, rel=1e-5)
    steps = [r for r in ogpsa_log(zero) if "removed_fraction" in r]
    ddp_steps = [r for r in ogpsa_log(ddp) if "removed_fraction" in r]
    for a, b in zip(ddp_steps, steps):
        assert b["removed_fraction"] == pytest.approx(a["removed_fraction"], rel=1e-4)
        assert b["update_in_range_norm"] == pytest.approx(a["update_in_range_norm"], rel=1e-3, abs=1e-6)
