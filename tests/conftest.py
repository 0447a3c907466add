"""Shared fixtures: the embedded default model and tiny random models for parity tests.

Without CUDA, the Triton kernels run through the Triton interpreter. TRITON_INTERPRET
must be set before triton is first imported (transformers may import it too), so it is
set here, before any test module is collected.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Engines whose test does not choose run their core in a thread: a core process costs
# seconds to start. tests/engine/test_engine.py pins the native client in both modes, and
# the API tests' `pokeserve serve` always runs its core in a process.
os.environ.setdefault("POKESERVE_ENGINE_CORE", "thread")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.models.default_model import fetch_default_model

    return fetch_default_model(log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a tiny random model (see tests/tiny_models.py)."""
    from tests.tiny_models import family_configs, save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny_model(cfg, root / name) for name, cfg in family_configs().items()}


@pytest.fixture(scope="session")
def tiny_harmony_model_dir(tmp_path_factory) -> Path:
    """A tiny random gpt-oss with a harmony tokenizer and chat template (tests/tiny_models.py)."""
    from tests.tiny_models import save_tiny_harmony_model

    return save_tiny_harmony_model(tmp_path_factory.mktemp("tiny-harmony") / "gpt-oss")


@pytest.fixture(scope="session")
def tiny_moe_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen3-MoE in both weight layouts: `hub` (one tensor per expert, as
    `save_pretrained` writes) and `fused` (transformers' in-memory 3-D tensors)."""
    from tests.tiny_models import moe_config, save_state_dict_copy, save_tiny_model

    root = tmp_path_factory.mktemp("tiny-moe")
    hub = save_tiny_model(moe_config(), root / "hub")
    return {"hub": hub, "fused": save_state_dict_copy(hub, root / "fused")}


@pytest.fixture(scope="session")
def tiny_gpt_oss_mxfp4_dir(tiny_harmony_model_dir) -> Path:
    """The tiny gpt-oss with random MXFP4 experts, as hub checkpoints store them."""
    from tests.tiny_models import save_mxfp4_copy

    return save_mxfp4_copy(tiny_harmony_model_dir, tiny_harmony_model_dir.parent / "mxfp4")


@pytest.fixture(scope="session")
def hybrid_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a tiny random Qwen3.5 model (see tests/tiny_models.py)."""
    from tests.tiny_models import hybrid_configs, save_tiny_model

    root = tmp_path_factory.mktemp("hybrid-models")
    return {name: save_tiny_model(cfg, root / name) for name, cfg in hybrid_configs().items()}
