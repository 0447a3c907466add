"""A checkpoint store over an empty root, for the tiny Llama base, with its archive cache
under the test's own directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoints.store import CheckpointStore
from engine.models.registry import load_model_config

STORE_BASE = "llama-gqa-untied"


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(root, cache, tiny_model_dirs) -> CheckpointStore:
    return CheckpointStore(root, STORE_BASE, load_model_config(tiny_model_dirs[STORE_BASE]),
                           cache_dir=cache)
