"""The batch-invariant mode with checkpoints: a request on a checkpoint gets the same bits
whatever the engine served before and beside it.

Requests on the base and on two LoRA checkpoints arrive together, so the engine merges
one checkpoint after another into the same weights (A, B, the base, A again...); each
request's tokens and logprobs are bitwise what it gives alone on a fresh engine, and its
sample-time logprobs bitwise what `compute_logprobs` gives under its checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.config import EngineConfig
from tests.engine.checkpoints.helpers import ALL_LINEAR, save_peft_adapter

RUN = "run:train:0"
CHECKPOINTS = [None, f"tinker://{RUN}/sampler_weights/a", f"tinker://{RUN}/sampler_weights/b"]
PROMPTS = [[5, 17, 42, 99, 7, 23, 61, 130, 8, 77], [200, 3, 54, 9], list(range(30, 75))]


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama-gqa-untied"]
    root = tmp_path_factory.mktemp("checkpoints")
    save_peft_adapter(model_dir, root / RUN / "sampler_weights" / "a", seed=1)
    save_peft_adapter(model_dir, root / RUN / "sampler_weights" / "b", seed=2, r=4,
                      targets=ALL_LINEAR[:4])
    return model_dir, root


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=1.0, seed=seed, ignore_eos=True, stop=[])


def engine(setup, dtype, **options) -> Engine:
    model_dir, root = setup
    return Engine(model_dir, dtype=dtype, batch_invariant=True, checkpoint_root=str(root),
                  kv_cache_memory=1 << 24, progress=False, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpoints_request_gets_its_own_bits_whatever_was_merged_before(setup, dtype):
    jobs = [(ckpt, prompt, seed) for seed, (ckpt, prompt) in enumerate(
        (c, p) for p in PROMPTS for c in CHECKPOINTS)]
    alone = {}
    for ckpt, prompt, seed in jobs:
        fresh = engine(setup, dtype)
        try:
            out = fresh.sampling_client(ckpt).sample(ModelInput.from_ints(prompt), 1,
                                                     params(seed)).result(60).sequences[0]
            alone[ckpt, seed] = (out.tokens, out.logprobs)
        finally:
            fresh.shutdown()
    shared = engine(setup, dtype, block_size=4, max_num_batched_tokens=16)
    try:
        futures = {(ckpt, seed): shared.sampling_client(ckpt).sample(
            ModelInput.from_ints(prompt), 1, params(seed)) for ckpt, prompt, seed in jobs}
        for (ckpt, seed), future in futures.items():
            seq = future.result(60).sequences[0]
            assert (seq.tokens, seq.logprobs) == alone[ckpt, seed]
        for ckpt, prompt, seed in jobs:
            tokens, logprobs = alone[ckpt, seed]
            again = shared.sampling_client(ckpt).compute_logprobs(
                ModelInput.from_ints(prompt + tokens)).result(60)
            assert again[len(prompt):] == logprobs
    finally:
        shared.shutdown()


def test_the_mode_serves_checkpoints_merged_and_refuses_the_unmerged_mode():
    assert EngineConfig(batch_invariant=True).lora_mode == "merged"
    assert EngineConfig(batch_invariant=True, lora_mode="merged").lora_mode == "merged"
    assert EngineConfig().lora_mode == "auto"
    with pytest.raises(ValueError, match="cannot go with lora_mode 'unmerged'"):
        EngineConfig(batch_invariant=True, lora_mode="unmerged")
