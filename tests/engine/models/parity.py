"""The engine against transformers: greedy tokens exactly, logprobs within 1e-4 (float32).

A batch of prompts of different lengths is decoded greedily for 32 tokens, under every
cache layout the engine may use: small and large blocks, prefix-cache hits, preemption
(a cache too small for the batch) and chunked prefill. Each family's test runs it. A
model with linear-attention layers resumes cached prefixes from kept states
(engine.state_snapshots) and must give back every state slot too.
"""

from __future__ import annotations

import json
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


def load_transformers_model(model_dir: Path):
    """The class config.json names (a vision-language checkpoint loads as itself), float32."""
    import transformers

    architecture = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    model_class = getattr(transformers, architecture)
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_greedy(model_dir: Path, prompt: list[int], new_tokens: int = NEW_TOKENS) -> Greedy:
    """Greedy decoding by hand with full recomputation: the plainest possible oracle."""
    model = load_transformers_model(model_dir)
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def transformers_outputs(model_dir: Path, prompts: list[list[int]] = PROMPTS,
                         new_tokens: int = NEW_TOKENS) -> list[Greedy]:
    """The oracle for each of `prompts`."""
    return [transformers_greedy(model_dir, p, new_tokens) for p in prompts]


def assert_engine_matches(model_dir: Path, layout: str, expected: list[Greedy],
                          layouts: dict[str, dict] = ENGINE_LAYOUTS,
                          prompts: list[list[int]] = PROMPTS) -> None:
    engine = Engine(model_dir, progress=False, **layouts[layout])
    try:
        client = engine.sampling_client()
        new_tokens = len(expected[0][0])
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])
        # One prompt first, so the shared prefix is cached; then the rest all at once: they
        # batch, hit the prefix cache, and (tiny cache) preempt each other.
        first = client.sample(ModelInput.from_ints(prompts[1]), 1, params)
        first.result(timeout=120)
        futures = [client.sample(ModelInput.from_ints(p), 1, params) for p in prompts]
        for future, (want_tokens, want_logprobs) in zip([first] + futures,
                                                        expected[1:2] + expected):
            seq = future.result(timeout=120).sequences[0]
            assert seq.tokens == want_tokens
            torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(want_logprobs),
                                       atol=1e-4, rtol=0)
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        block_size = layouts[layout]["block_size"]
        assert stats.num_prefix_cached_tokens >= len(SHARED) // block_size * block_size
        if engine.model_config.linear_attention is not None:
            assert stats.num_free_state_slots == stats.num_total_state_slots > 0
        if layout == "preemption":
            assert stats.num_preemptions > 0
    finally:
        engine.shutdown()
