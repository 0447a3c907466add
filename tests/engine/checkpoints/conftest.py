"""A checkpoint store over an empty root, for the tiny Llama base, with its archive cache
under the test's own directory; and the base the serving tests adapt."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoints.store import CheckpointStore
from engine.models.registry import load_model_config

STORE_BASE = "llama-gqa-untied"
SERVED_BASE = "llama3-rope-scaling"   # tied embeddings: head and embedding adapters meet


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


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs) -> Path:
    """The base that serving tests adapt (a module may override it)."""
    return tiny_model_dirs[SERVED_BASE]
