"""Shared fixtures: the embedded default model and tiny random models for parity tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.default_model import fetch_default_model

    return fetch_default_model(log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a tiny random model (see tests/tiny_models.py)."""
    from tests.tiny_models import family_configs, save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny_model(cfg, root / name) for name, cfg in family_configs().items()}
