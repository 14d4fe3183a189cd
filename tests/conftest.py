"""Fixtures and hooks only; what the tests share otherwise is in helpers.py (`from helpers import ...`).

The offline environment of helpers.ENV is set for this process before any test module imports torch
(OMP_NUM_THREADS=1 among it), and for every process the tests start.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ENV

os.environ.update(ENV)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """{'model': dir, 'data': dir}: a random tiny Qwen2 + tokenizer and the toy datasets."""
    from ogpsa.data_prep import tiny as tiny_assets

    return tiny_assets.build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """`trained(**overrides)`: the output folder of `base_config(tiny, ..., **overrides)` trained through
    `llamafactory-cli train`, once per test run for the same overrides: the plain baselines several tests
    compare against (helpers.PLAIN_ADAMW_3, PLAIN_ADAMW_4, ...) and runs whose copies tests change.
    Read it or copy it; never write into it."""
    import json

    from helpers import base_config, run_cli

    root = tmp_path_factory.mktemp("trained")
    done: dict[str, Path] = {}

    def train(**overrides) -> Path:
        key = json.dumps(overrides, sort_keys=True)
        if key not in done:
            work = root / f"run{len(done)}"
            run_cli(base_config(tiny, work / "out", **overrides), work)
            done[key] = work / "out"
        return done[key]

    return train


@pytest.fixture(scope="session")
def start_losses(tiny) -> dict[str, float]:
    """helpers.reference_losses of the tiny start model on the reference sets and the training targets
    (toy_safety_sft, toy_dpo_chosen): the starting point every preservation test measures from."""
    from helpers import REFS, reference_losses

    return reference_losses(tiny["model"], tiny, REFS + ["toy_safety_sft", "toy_dpo_chosen"])
