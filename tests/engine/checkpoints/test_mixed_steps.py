"""Steps that mix checkpoints: each request's output in a mixed batch is its checkpoint's
own (oracles: transformers + PEFT, and the same request served alone, merged), for
adapters of different ranks, rsLoRA, rank and alpha patterns, head (`unembed_tokens`)
and embedding adapters; the switch between merged and mixed steps is exact; prefix-cache
blocks stay with their checkpoint; a bad checkpoint fails only its own requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    greedy,
    peft_logprobs_fn,
    save_peft_adapter,
    to_training_service_layout,
)

RUN = "mix:train:0"
PROMPTS = [[5, 17, 42, 99, 7, 23, 61, 130, 8, 77], [200, 3, 54, 9], [11, 12, 13, 14, 15, 16]]
TOLERANCE = 1e-4
NUM_TOKENS = 12


def name(step: str) -> str:
    return f"tinker://{RUN}/sampler_weights/{step}"


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dir) -> Path:
    """Four adapters of different shapes, and where PEFT's own copy of each lies."""
    root = tmp_path_factory.mktemp("checkpoints")
    steps = root / RUN / "sampler_weights"
    peft_wide = save_peft_adapter(model_dir, root / "peft-wide", seed=1, r=8,
                                  targets=[*ALL_LINEAR, "lm_head"])
    to_training_service_layout(peft_wide, steps / "wide")        # the head as unembed_tokens
    save_peft_adapter(model_dir, steps / "rs", seed=2, r=4, use_rslora=True,
                      targets=["q_proj", "down_proj", "embed_tokens"])
    save_peft_adapter(model_dir, steps / "pattern", seed=3, r=6, lora_alpha=12,
                      rank_pattern={"v_proj": 2, "gate_proj": 3}, alpha_pattern={"o_proj": 3.0})
    save_peft_adapter(model_dir, steps / "narrow", seed=4, r=1, targets=["k_proj", "up_proj"])
    return root


PEFT_DIRS = {"wide": "peft-wide"}   # where the reference reads an adapter from, if elsewhere
STEPS = ["wide", "rs", "pattern", "narrow"]


def greedy_params(prompt_logprobs: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, stop=[],
                          prompt_logprobs=0 if prompt_logprobs else None)


def sample(engine: Engine, jobs: list[tuple[str | None, list[int]]], **params) -> list:
    """All `jobs` (checkpoint name, prompt) submitted at once; each one's response."""
    futures = [engine.sampling_client(c).sample(ModelInput.from_ints(p), 1, greedy_params(**params))
               for c, p in jobs]
    return [f.result(timeout=120) for f in futures]


def alone(engine: Engine, jobs: list[tuple[str | None, list[int]]], **params) -> list:
    """Each job served on its own: one checkpoint per step, merged."""
    return [sample(engine, [job], **params)[0] for job in jobs]


def assert_same_outputs(mixed, single) -> None:
    for got, want in zip(mixed, single):
        assert got.sequences[0].tokens == want.sequences[0].tokens
        torch.testing.assert_close(torch.tensor(got.sequences[0].logprobs),
                                   torch.tensor(want.sequences[0].logprobs),
                                   atol=TOLERANCE, rtol=0)


def unmerged_steps(engine: Engine) -> int:
    return engine.stats().num_unmerged_lora_steps


JOBS = [(name(step), prompt) for prompt in PROMPTS for step in STEPS] + [(None, PROMPTS[0])]


@pytest.fixture(scope="module")
def engine(model_dir, root):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=512, checkpoint_root=str(root),
                 max_num_seqs=32, progress=False)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def served_alone(engine):
    before = unmerged_steps(engine)
    responses = alone(engine, JOBS)
    assert unmerged_steps(engine) == before        # one checkpoint a step: the merged path
    return responses


def test_each_request_in_a_mixed_batch_gets_what_its_checkpoint_gives_alone(engine, served_alone):
    before = unmerged_steps(engine)
    mixed = sample(engine, JOBS)
    assert unmerged_steps(engine) > before
    assert_same_outputs(mixed, served_alone)


def test_mixed_batch_outputs_match_peft(engine, model_dir, root):
    mixed = sample(engine, JOBS)
    for (checkpoint, prompt), response in zip(JOBS, mixed):
        step = checkpoint.rsplit("/", 1)[-1] if checkpoint else None
        adapter = None if step is None else (root / PEFT_DIRS[step] if step in PEFT_DIRS
                                             else root / RUN / "sampler_weights" / step)
        logprobs = peft_logprobs_fn(model_dir, adapter)
        tokens = greedy(logprobs, prompt, NUM_TOKENS)
        rows = logprobs(prompt + tokens)[len(prompt) - 1:-1]
        expected = rows.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert response.sequences[0].tokens == tokens, checkpoint
        torch.testing.assert_close(torch.tensor(response.sequences[0].logprobs), expected,
                                   atol=TOLERANCE, rtol=0)


def test_merged_then_mixed_then_merged_again_is_bit_exact(model_dir, root):
    # No prefix cache: the last request recomputes everything with the merged weights.
    eng = Engine(model_dir, block_size=4, num_kv_blocks=128, checkpoint_root=str(root),
                 enable_prefix_caching=False, progress=False)
    try:
        job = (name("wide"), PROMPTS[0])
        first = alone(eng, [job], prompt_logprobs=True)[0]
        sample(eng, [job, (name("rs"), PROMPTS[1]), (None, PROMPTS[2])])
        assert unmerged_steps(eng) > 0
        again = alone(eng, [job], prompt_logprobs=True)[0]
    finally:
        eng.shutdown()
    assert again.sequences[0].tokens == first.sequences[0].tokens
    assert again.sequences[0].logprobs == first.sequences[0].logprobs      # bit-identical floats
    assert again.prompt_logprobs == first.prompt_logprobs


def test_prefix_cache_blocks_serve_only_their_own_checkpoint_in_a_mixed_batch(model_dir, root):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=128, checkpoint_root=str(root),
                 progress=False)
    try:
        prompt = PROMPTS[0]                        # 10 tokens: 2 full blocks to share
        jobs = [(name("wide"), prompt), (name("rs"), prompt)]
        first = sample(eng, jobs)
        assert eng.stats().num_prefix_cached_tokens == 0   # A's blocks were not B's
        again = sample(eng, [*jobs, (None, prompt)])
        # Each checkpoint hits its own 8 tokens; the base model has none of its own.
        assert eng.stats().num_prefix_cached_tokens == 16
        assert unmerged_steps(eng) > 0
    finally:
        eng.shutdown()
    assert_same_outputs(again[:2], first)


def test_more_checkpoints_than_max_loras_take_turns_and_get_their_own_outputs(
        model_dir, root, served_alone):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=512, checkpoint_root=str(root),
                 max_loras=2, progress=False)
    seen = []
    prepare = eng.core.lora.prepare
    eng.core.lora.prepare = lambda ckpts: seen.append(ckpts) or prepare(ckpts)
    try:
        mixed = sample(eng, JOBS)
    finally:
        eng.shutdown()
    assert max(sum(c is not None for c in ckpts) for ckpts in seen) == 2
    assert_same_outputs(mixed, served_alone)


def test_a_checkpoint_broken_after_it_was_resolved_fails_only_its_requests(model_dir, root,
                                                                            served_alone):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=128, checkpoint_root=str(root),
                 progress=False)
    broken = save_peft_adapter(model_dir, root / RUN / "sampler_weights" / "broken", seed=9)
    try:
        info = eng.checkpoints.resolve(name("broken"))
        weights = broken / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])           # the trainer rewrote it badly
        [stream] = eng.add_request(PROMPTS[0], greedy_params(), checkpoint=info)
        others = sample(eng, JOBS[:4])                             # in the same steps
        last = list(stream)[-1]
    finally:
        eng.shutdown()
    assert last.finish_reason == "error" and "adapter_model.safetensors is corrupt" in last.error
    assert_same_outputs(others, served_alone[:4])


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_a_lora_mode_forces_one_path_with_the_same_outputs(mode, model_dir, root, served_alone):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=512, checkpoint_root=str(root),
                 lora_mode=mode, progress=False)
    try:
        single = alone(eng, JOBS[:3])
        unmerged_alone = unmerged_steps(eng)
        mixed = sample(eng, JOBS)
        total = unmerged_steps(eng)
    finally:
        eng.shutdown()
    assert (unmerged_alone > 0, total > 0) == ((False, False) if mode == "merged" else (True, True))
    assert_same_outputs(single, served_alone[:3])
    assert_same_outputs(mixed, served_alone)
