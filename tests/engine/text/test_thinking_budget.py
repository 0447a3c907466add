"""A thinking budget: after that many tokens inside the trace, the engine forces the end
marker into the sequence, then goes on sampling the answer."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, ModelInput, ReasoningOptions, SamplingParams
from engine.client import SampledSequence
from engine.text.think_tags import THINK_TAGS

# The prompt ends inside an open trace (as Qwen3's template leaves it), or it does not.
OPEN, CLOSED = "the fox <think>", "the fox"


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], block_size=4, num_kv_blocks=128,
                 progress=False)
    yield eng
    eng.shutdown()


def end_ids(engine) -> list[int]:
    return engine.tokenizer.encode(THINK_TAGS.forced_end, add_special_tokens=False)


def prompt_ids(engine, text: str = OPEN) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def generate(engine, budget: int | None, prompt: str = OPEN, max_tokens: int = 24) -> SampledSequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[])
    reasoning = ReasoningOptions(THINK_TAGS, budget=budget) if budget is not None else None
    [stream] = engine.add_request(prompt_ids(engine, prompt), params, reasoning=reasoning)
    outs = list(stream)
    return SampledSequence([t for o in outs for t in o.token_ids],
                           [lp for o in outs for lp in o.logprobs])


@pytest.mark.parametrize("budget", [0, 3, 10])
def test_end_marker_is_forced_after_exactly_the_budget(engine, budget):
    free = generate(engine, None).tokens
    forced = generate(engine, budget).tokens
    marker = end_ids(engine)
    assert "</think>" not in engine.tokenizer.decode(free)      # the model never closes it itself
    assert forced[:budget] == free[:budget]
    assert forced[budget:budget + len(marker)] == marker
    assert len(forced) == 24                                    # and then it goes on


def test_forced_tokens_carry_the_models_own_logprobs(engine):
    seq = generate(engine, 2)
    prompt = prompt_ids(engine)
    recomputed = engine.sampling_client().compute_logprobs(
        ModelInput.from_ints(prompt + seq.tokens)).result(60)[len(prompt):]
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(recomputed),
                               atol=1e-5, rtol=0)


def test_no_budget_applies_when_the_output_never_opens_a_trace(engine):
    free = generate(engine, None, prompt=CLOSED).tokens
    assert generate(engine, 0, prompt=CLOSED).tokens == free


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget"):
        ReasoningOptions(THINK_TAGS, budget=-1)
