"""Fixtures and hooks only; what the tests share otherwise is in helpers.py (`from helpers import ...`).

The offline environment of helpers.ENV is set for this process before any test module imports torch
(OMP_NUM_THREADS=1 among it), and for every process the tests start.
"""

from __future__ import annotations

import os

import pytest

from helpers import ENV

os.environ.update(ENV)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """{'model': dir, 'data': dir}: a random tiny Qwen2 + tokenizer and the toy datasets."""
    from ogpsa.data_prep import tiny as tiny_assets

    return tiny_assets.build(tmp_path_factory.mktemp("tiny"))
