"""ogpsa_dpo end to end through `llamafactory-cli train`: LLaMA-Factory's DPO workflow, projected."""

import pytest
from helpers import REFS, base_config, load_state, log_history, ogpsa_keys, ogpsa_log, reference_losses, run_cli


DPO = {"stage": "dpo", "dataset": "toy_safety_dpo", "pref_beta": 0.1}
# plain SGD, rebuild every step: the plain run is shared by the preservation and observe-mode tests
DPO_SGD = {**DPO, "optim": "sgd", "learning_rate": 0.02, "max_steps": 4, "max_grad_norm": 0.0}


def dpo_config(tiny, out, **overrides):
    return base_config(tiny, out, **{**DPO, **overrides})


@pytest.mark.parametrize("finetuning,loss", [("full", "sigmoid"), ("lora", "sigmoid"), ("full", "orpo")])
def test_ogpsa_dpo_runs_and_logs(tiny, tmp_path, finetuning, loss):
    extra = {"lora_target": "all", "lora_rank": 4} if finetuning == "lora" else {}
    extra["pref_loss"] = loss
    out = tmp_path / "out"
    cfg = dpo_config(tiny, out, finetuning_type=finetuning, max_steps=3, learning_rate=1e-2, **extra,
                     **ogpsa_keys(stage="ogpsa_dpo", ogpsa_refresh_steps=None))
    run_cli(cfg, tmp_path / "run")
    history = [h for h in log_history(out) if "loss" in h]
    assert len(history) == 3
    for h in history:
        assert "rewards/margins" in h and "rewards/accuracies" in h  # DPO's own metrics untouched
        assert 0.0 < h["ogpsa/removed_fraction"] < 1.0
        for name in REFS:
            assert abs(h[f"ogpsa/cos_after/{name}"]) < 1e-4
    rebuilds = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    # default DPO refresh is 5 steps; LoRA adds a follow-up at step 1 (its A tensors have no reference
    # gradient while B = 0 at step 0)
    assert [r["step"] for r in rebuilds] == ([0, 1] if finetuning == "lora" else [0])
    assert [r["followup"] for r in rebuilds] == ([False, True] if finetuning == "lora" else [False])


def test_first_order_preservation_dpo(tiny, tmp_path, trained, start_losses):
    """Plain SGD, rebuild every step: reference losses move >=10x less, chosen answers still gain."""
    names = REFS + ["toy_dpo_chosen"]
    start = start_losses
    change = {}
    for kind, extra in (("plain", {}), ("ogpsa", ogpsa_keys(stage="ogpsa_dpo"))):
        out = trained(**DPO_SGD) if kind == "plain" else tmp_path / kind
        if kind != "plain":
            run_cli(base_config(tiny, out, **{**DPO_SGD, **extra}), tmp_path / f"run_{kind}")
        after = reference_losses(str(out), tiny, names)
        change[kind] = {n: after[n] - start[n] for n in names}
    plain_ref = max(abs(change["plain"][n]) for n in REFS)
    ogpsa_ref = max(abs(change["ogpsa"][n]) for n in REFS)
    print(f"largest reference-loss change: plain {plain_ref:.5f}, ogpsa {ogpsa_ref:.5f}; "
          f"chosen NLL change under ogpsa {change['ogpsa']['toy_dpo_chosen']:.4f}")
    assert plain_ref > 0.01
    assert ogpsa_ref * 10 <= plain_ref
    assert change["ogpsa"]["toy_dpo_chosen"] < -0.1  # the chosen responses gain likelihood


def test_observe_mode_dpo_is_bitwise_plain(tiny, tmp_path, trained):
    """A reference forward/backward before every step (the DPO workflow's reference model beside it)
    leaks nothing into the update: bitwise the plain run."""
    observed = tmp_path / "observe"
    run_cli(base_config(tiny, observed, **{**DPO_SGD, **ogpsa_keys(stage="ogpsa_dpo", ogpsa_mode="observe")}),
            tmp_path / "r2")
    assert sum(1 for r in ogpsa_log(observed) if r.get("event") == "rebuild") == 4
    a, b, start = load_state(trained(**DPO_SGD)), load_state(observed), load_state(tiny["model"])
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the plain run did train
