"""A thinking budget: after that many tokens inside the trace, the engine forces the end
marker into the sequence, then goes on sampling the answer."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.text.reasoning import THINK_TAGS

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], block_size=4, num_kv_blocks=128,
                 progress=False)
    yield eng
    eng.shutdown()


def end_ids(engine) -> list[int]:
    return engine.tokenizer.encode(THINK_TAGS.forced_end, add_special_tokens=False)


def generate(engine, budget: int | None, open_at_start: bool = True, max_tokens: int = 24):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[],
                            reasoning_format=THINK_TAGS if budget is not None else None,
                            thinking_budget=budget, thinking_end_ids=end_ids(engine)
                            if budget is not None else [], thinking_open_at_start=open_at_start)
    return engine.sampling_client().sample(ModelInput.from_ints(PROMPT), 1, params).result(60)


@pytest.mark.parametrize("budget", [0, 3, 10])
def test_end_marker_is_forced_after_exactly_the_budget(engine, budget):
    free = generate(engine, None).sequences[0].tokens
    forced = generate(engine, budget).sequences[0].tokens
    marker = end_ids(engine)
    assert "</think>" not in engine.tokenizer.decode(free)      # the model never closes it itself
    assert forced[:budget] == free[:budget]
    assert forced[budget:budget + len(marker)] == marker
    assert len(forced) == 24                                    # and then it goes on


def test_forced_tokens_carry_the_models_own_logprobs(engine):
    seq = generate(engine, 2).sequences[0]
    recomputed = engine.sampling_client().compute_logprobs(
        ModelInput.from_ints(PROMPT + seq.tokens)).result(60)[len(PROMPT):]
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(recomputed),
                               atol=1e-5, rtol=0)


def test_no_budget_applies_when_the_output_never_opens_a_trace(engine):
    free = generate(engine, None).sequences[0].tokens
    assert generate(engine, 0, open_at_start=False).sequences[0].tokens == free


def test_a_budget_needs_the_format_and_the_end_marker():
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=4)
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=-1, reasoning_format=THINK_TAGS, thinking_end_ids=[1])
