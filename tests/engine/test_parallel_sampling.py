"""n samples of one prompt share its one prefill, and each still gives what it would alone."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams, llm_engine

PROMPT = list(range(30, 80))        # 50 tokens: 12 full blocks of 4 and a partial one


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], block_size=4, num_kv_blocks=256,
                 enable_prefix_caching=False, progress=False)
    yield eng
    eng.shutdown()


def computed_prompt_tokens(engine, fn):
    before = engine.stats().num_computed_prompt_tokens
    result = fn()
    return result, engine.stats().num_computed_prompt_tokens - before


def test_sixteen_samples_compute_their_prompt_once(engine):
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=3, stop=[])
    client = engine.sampling_client()
    resp, computed = computed_prompt_tokens(
        engine, lambda: client.sample(ModelInput.from_ints(PROMPT), 16, params).result(60))
    assert computed == len(PROMPT)
    assert [len(s.tokens) for s in resp.sequences] == [4] * 16
    assert len({tuple(s.tokens) for s in resp.sequences}) > 1       # each its own stream
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_each_forked_sample_gives_what_it_gives_alone(engine, monkeypatch):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, stop=[])
    client = engine.sampling_client()
    together = client.sample(ModelInput.from_ints(PROMPT), 4, params).result(60).sequences
    seed_of = llm_engine._sample_seed
    for i, sample in enumerate(together):
        # Sample i alone: a one-sample request with sample i's own random stream.
        monkeypatch.setattr(llm_engine, "_sample_seed", lambda seed, _, i=i: seed_of(seed, i))
        alone = client.sample(ModelInput.from_ints(PROMPT), 1, params).result(60).sequences[0]
        assert alone.tokens == sample.tokens
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(sample.logprobs),
                                   atol=1e-5, rtol=0)


def first_prompt_logprobs(stream) -> list[float | None]:
    return next(o.prompt_logprobs for o in stream if o.prompt_logprobs is not None)


def test_prompt_logprobs_go_to_every_sample(engine):
    params = SamplingParams(max_tokens=2, prompt_logprobs=0)
    [alone] = engine.add_request(PROMPT[:9], params)
    expected = first_prompt_logprobs(alone)
    assert expected[0] is None and len(expected) == 9
    for stream in engine.add_request(PROMPT[:9], params, num_samples=3):
        got = first_prompt_logprobs(stream)
        assert got[0] is None
        torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(expected[1:]),
                                   atol=1e-5, rtol=0)
