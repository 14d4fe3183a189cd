"""Reference sets are tokenised with their own data arguments, whatever the training data's settings.

Each run trains one step through `llamafactory-cli train`; the subspace is built once, at step 0,
on the untouched model, so its record (token count and gradient norm of every reference set) must
be the same as in a run without the training-data settings under test. A run holds several settings
that can go together (any one of them reaching the reference sets changes the record).
"""

import pytest
from helpers import base_config, ogpsa_keys, ogpsa_log, run_cli

# cutoff_len 32 cuts every toy reference sample, so a cutoff that is off by one shows in the counts
CUTOFF = 32
TWO = {"dataset": "toy_safety_sft,toy_dpo_chosen"}
SETTINGS = {
    # mixing, sampling and splitting of the training data
    "interleave_probs+max_samples+val_size": {**TWO, "mix_strategy": "interleave_under", "interleave_probs": "0.7,0.3",
                                              "max_samples": 4, "val_size": 0.25},
    # stock LLaMA-Factory streams a local file as `num_shards=dataloader_num_workers` shards: 0 is empty
    "mix_strategy+streaming": {**TWO, "mix_strategy": "interleave_over", "streaming": True, "dataloader_num_workers": 1},
    # neat packing packs too (and shortens cutoff_len by one, as packing does)
    "packing+neat_packing": {"packing": True, "neat_packing": True},
}


def _first_rebuild(tiny, tmp_path, label: str, **extra) -> dict:
    out = tmp_path / label / "out"
    cfg = base_config(tiny, out, max_steps=1, cutoff_len=CUTOFF, **ogpsa_keys(ogpsa_refresh_steps=0), **extra)
    run_cli(cfg, tmp_path / label)
    return next(r for r in ogpsa_log(out) if r.get("event") == "rebuild")


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    return _first_rebuild(tiny, tmp_path_factory.mktemp("refs"), "baseline")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_reference_sets_ignore_training_data_settings(tiny, tmp_path, baseline, setting):
    got = _first_rebuild(tiny, tmp_path, setting, **SETTINGS[setting])
    tokens = {k: v for k, v in baseline.items() if k.startswith("tokens/")}
    assert len(tokens) == 3 and all(v > 0 for v in tokens.values())
    assert {k: got[k] for k in tokens} == tokens
    for key in (k for k in baseline if k.startswith("grad_norm/")):
        assert got[key] == pytest.approx(baseline[key], rel=1e-5)
