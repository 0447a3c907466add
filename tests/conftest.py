"""Shared fixtures: the embedded default model and tiny random models for parity tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.default_model import fetch_default_model

    return fetch_default_model(log=lambda msg: None)
