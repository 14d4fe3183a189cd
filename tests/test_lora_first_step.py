"""LoRA is projected from its first step: the A matrices get no reference gradient while B = 0."""

import pytest
from helpers import REFS, assert_projection_logged, ogpsa_keys, ogpsa_log, reference_losses

from ogpsa.plugin.methods.gradient_span.method import followup_after

LORA = {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 4, "optim": "sgd", "max_grad_norm": 0.0,
        "learning_rate": 0.2, "max_steps": 6}


@pytest.fixture(scope="module")
def runs(trained) -> dict:
    """{'plain', 'ogpsa'}: LoRA on every linear layer, plain and rebuilt every 3 steps (read only)."""
    return {"plain": trained(**LORA), "ogpsa": trained(**LORA, **ogpsa_keys(ogpsa_refresh_steps=3))}


def test_lora_rebuilds_once_more_after_its_first_step(tiny, runs, start_losses):
    """Rebuild every 3 steps: the zero-gradient A blocks of step 0 get their directions from a
    follow-up rebuild at step 1 (not at step 3), and the reference losses hold."""
    names = REFS + ["toy_safety_sft"]
    start = start_losses
    change = {}
    for kind, out in runs.items():
        after = reference_losses(tiny["model"], tiny, names, adapter=str(out))
        change[kind] = {n: after[n] - start[n] for n in names}
    rebuilds = [r for r in ogpsa_log(runs["ogpsa"]) if r.get("event") == "rebuild"]
    assert [r["step"] for r in rebuilds] == [0, 1, 3]
    assert [r["followup"] for r in rebuilds] == [False, True, False]
    assert rebuilds[0]["zero_rank_blocks"] > 0  # every A (half of the adapter tensors) at step 0
    # after one step every LoRA tensor (A and B) has at least one direction
    assert rebuilds[1]["zero_rank_blocks"] == 0 and rebuilds[2]["zero_rank_blocks"] == 0
    worst = {kind: max(abs(change[kind][n]) for n in REFS) for kind in change}
    print(f"largest reference-loss change under LoRA: plain {worst['plain']:.5f}, ogpsa {worst['ogpsa']:.5f}; "
          f"safety loss change under ogpsa {change['ogpsa']['toy_safety_sft']:.4f}")
    assert worst["plain"] > 0.03, "the learning rate must visibly move the reference losses under plain LoRA"
    assert worst["ogpsa"] * 10 <= worst["plain"]
    assert change["ogpsa"]["toy_safety_sft"] < -0.03  # the safety loss still falls


def test_lora_logs_its_metrics_and_keeps_the_basis_on_the_adapter(runs):
    """Every logged step carries the projection's metrics (the projected gradient orthogonal to every
    reference gradient); the subspace lives on the adapter weights only, at most 3 directions of them."""
    from safetensors.torch import load_file

    out = runs["ogpsa"]
    rebuilds = assert_projection_logged(out, 6)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    trainable = sum(t.numel() for t in adapter.values())
    assert rebuilds[0]["param_numel"] == trainable
    assert 0 < rebuilds[0]["basis_bytes"] <= 3 * trainable * 4


def test_followup_is_asked_for_once_per_new_zero_block():
    # step 0: A blocks 1 and 3 zero -> follow-up
    due, still = followup_after({1, 3}, set(), followup=False)
    assert due and still == set()
    # the follow-up: block 3 is never reached by the reference data
    due, still = followup_after({3}, still, followup=True)
    assert not due and still == {3}
    # the next scheduled rebuild finds only block 3 zero: no second follow-up
    assert followup_after({3}, still, followup=False) == (False, {3})
    # ...but a block that had a direction and lost it does get one
    assert followup_after({2, 3}, still, followup=False) == (True, {3})
