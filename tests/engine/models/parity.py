"""The engine against transformers: greedy tokens exactly, logprobs within 1e-4 (float32).

A batch of prompts of different lengths is decoded greedily for 32 tokens, under every
cache layout the engine may use: small and large blocks, prefix-cache hits, preemption
(a cache too small for the batch) and chunked prefill. Each family's test runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine import Engine, ModelInput, SamplingParams

NEW_TOKENS = 32
SHARED = list(range(11, 31))                               # a prefix several prompts share
PROMPTS = [[5, 6, 7], SHARED + [40, 41], list(range(60, 81)), SHARED + [42], [9]]

ENGINE_LAYOUTS = {
    "block4": dict(block_size=4, num_kv_blocks=256),
    "block16": dict(block_size=16, num_kv_blocks=64),
    "preemption": dict(block_size=4, num_kv_blocks=20),      # 80 slots: about two sequences
    "chunked-prefill": dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=8),
}

Greedy = tuple[list[int], list[float]]      # tokens, and the logprob of each


def transformers_greedy(model_dir: Path, prompt: list[int]) -> Greedy:
    """Greedy decoding by hand with full recomputation: the plainest possible oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def transformers_outputs(model_dir: Path) -> list[Greedy]:
    """The oracle for each of PROMPTS."""
    return [transformers_greedy(model_dir, p) for p in PROMPTS]


def assert_engine_matches(model_dir: Path, layout: str, expected: list[Greedy]) -> None:
    engine = Engine(model_dir, progress=False, **ENGINE_LAYOUTS[layout])
    try:
        client = engine.sampling_client()
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop=[])
        # One prompt first, so the shared prefix is cached; then the rest all at once: they
        # batch, hit the prefix cache, and (tiny cache) preempt each other.
        first = client.sample(ModelInput.from_ints(PROMPTS[1]), 1, params)
        first.result(timeout=120)
        futures = [client.sample(ModelInput.from_ints(p), 1, params) for p in PROMPTS]
        for future, (want_tokens, want_logprobs) in zip([first] + futures,
                                                        expected[1:2] + expected):
            seq = future.result(timeout=120).sequences[0]
            assert seq.tokens == want_tokens
            torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(want_logprobs),
                                       atol=1e-4, rtol=0)
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        block_size = ENGINE_LAYOUTS[layout]["block_size"]
        assert stats.num_prefix_cached_tokens >= len(SHARED) // block_size * block_size
        if layout == "preemption":
            assert stats.num_preemptions > 0
    finally:
        engine.shutdown()
