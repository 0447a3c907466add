"""The engine against transformers: greedy tokens exactly, logprobs within 1e-4 (float32).

For every supported family, a batch of prompts of different lengths is decoded greedily
for 32 tokens, under every cache layout the engine may use: small and large blocks,
prefix-cache hits, preemption (a cache too small for the batch) and chunked prefill.
"""

from __future__ import annotations

import pytest

from engine import Engine
from tests.engine.models.oracle import assert_engine_decodes_like_transformers, transformers_greedy
from tests.tiny_models import family_configs

NEW_TOKENS = 32
SHARED = list(range(11, 31))                               # a prefix several prompts share
PROMPTS = [[5, 6, 7], SHARED + [40, 41], list(range(60, 81)), SHARED + [42], [9]]

ENGINE_LAYOUTS = {
    "block4": dict(block_size=4, num_kv_blocks=256),
    "block16": dict(block_size=16, num_kv_blocks=64),
    "preemption": dict(block_size=4, num_kv_blocks=20),      # 80 slots: about two sequences
    "chunked-prefill": dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=8),
}


@pytest.fixture(scope="module")
def oracle(tiny_model_dirs):
    return {name: [transformers_greedy(tiny_model_dirs[name], p, NEW_TOKENS) for p in PROMPTS]
            for name in tiny_model_dirs}


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("family", list(family_configs()))
def test_greedy_tokens_and_logprobs_match_transformers(family, layout, tiny_model_dirs, oracle):
    engine = Engine(tiny_model_dirs[family], progress=False, **ENGINE_LAYOUTS[layout])
    try:
        # PROMPTS[1] alone first, so the shared prefix is cached: the others then hit it.
        assert_engine_decodes_like_transformers(engine, PROMPTS, oracle[family], NEW_TOKENS)
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        block_size = ENGINE_LAYOUTS[layout]["block_size"]
        assert stats.num_prefix_cached_tokens >= len(SHARED) // block_size * block_size
        if layout == "preemption":
            assert stats.num_preemptions > 0
    finally:
        engine.shutdown()
