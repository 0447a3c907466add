"""The Llama family (Llama, Qwen2, Qwen3 dense) against transformers: see parity.py."""

from __future__ import annotations

import pytest

from tests.engine.models.parity import ENGINE_LAYOUTS, assert_engine_matches, transformers_outputs
from tests.tiny_models import family_configs


@pytest.fixture(scope="module")
def oracle(tiny_model_dirs):
    return {name: transformers_outputs(tiny_model_dirs[name]) for name in tiny_model_dirs}


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("family", list(family_configs()))
def test_greedy_tokens_and_logprobs_match_transformers(family, layout, tiny_model_dirs, oracle):
    assert_engine_matches(tiny_model_dirs[family], layout, oracle[family])
