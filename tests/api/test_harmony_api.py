"""gpt-oss's harmony format through the openai SDK: channels split into reasoning and
content, reasoning_effort native to the template, the thinking budget forcing the answer.

The model is a tiny gpt-oss scripted to open an analysis message and think on forever
(`<|channel|>analysis<|message|>User asks` and then `s` after `s`): only the thinking
budget, by forcing `<|end|><|start|>assistant<|channel|>final<|message|>`, brings an
answer, and the scripted model then writes the same body again. So every expected text
and count below follows from the script and the contract's budget, `ceil(effort *
max_tokens)` trace tokens.
"""

from __future__ import annotations

import math

import openai
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import API_KEY, running_server
from tests.tiny_models import save_scripted_harmony_model

HEADER = "<|channel|>analysis<|message|>"
BODY = "User asks"
FORCED_FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
MAX_TOKENS = 200   # enough for an answer after the forced marker at every effort
EFFORTS = {"minimal": 0.01, "low": 0.3, "medium": 0.6, "high": 0.9}   # the contract's
LEVELS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
          0.01: "low", 0.3: "low", 0.6: "medium", 0.9: "high"}       # the table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_scripted_harmony_model(tmp_path_factory.mktemp("harmony") / "gpt-oss",
                                       [HEADER, BODY], max_position_embeddings=512)


@pytest.fixture(scope="module")
def harmony_server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("harmony-server"),
                        "--dtype", "float32") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(harmony_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=harmony_server.v1, api_key=API_KEY)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def scripted_body(tokenizer, num_tokens: int) -> str:
    """The text of the script's body after `num_tokens` of its tokens."""
    assert num_tokens > 0
    ids = tokenizer.encode(BODY, add_special_tokens=False)
    ids += ids[-1:] * max(0, num_tokens - len(ids))
    return tokenizer.decode(ids[:num_tokens])


def chat(client, model: str, **kwargs):
    kwargs = {"max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                          **kwargs)


@pytest.mark.parametrize("effort", list(EFFORTS))
def test_analysis_is_the_reasoning_and_final_the_content_with_no_markup(
        client, model, tokenizer, effort) -> None:
    resp = chat(client, model, reasoning_effort=effort)
    budget = math.ceil(EFFORTS[effort] * MAX_TOKENS)
    header, forced = (len(tokenizer.encode(t, add_special_tokens=False))
                      for t in (HEADER, FORCED_FINAL))
    message = resp.choices[0].message
    assert message.reasoning_content == scripted_body(tokenizer, budget)
    assert message.content == scripted_body(tokenizer, MAX_TOKENS - header - budget - forced)
    assert resp.usage.completion_tokens_details.reasoning_tokens == budget
    assert resp.choices[0].finish_reason == "length"


def test_without_separate_reasoning_the_trace_is_inline_readable_text(client, model) -> None:
    split = chat(client, model, reasoning_effort="low").choices[0].message
    inline = chat(client, model, reasoning_effort="low",
                  extra_body={"separate_reasoning": False}).choices[0].message
    assert inline.content == f"{split.reasoning_content}\n\n{split.content}"
    assert inline.reasoning_content is None and "<|" not in inline.content


def test_streamed_reasoning_comes_before_the_content_and_joins_to_the_whole(client, model) -> None:
    whole = chat(client, model, reasoning_effort="medium").choices[0].message
    kinds, reasoning, content = [], "", ""
    for chunk in chat(client, model, reasoning_effort="medium", stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        piece = getattr(delta, "reasoning_content", None) if delta else None
        if piece:
            kinds.append("reasoning")
            reasoning += piece
        if delta and delta.content:
            kinds.append("content")
            content += delta.content
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert kinds == sorted(kinds, key=["reasoning", "content"].index) and "content" in kinds


@pytest.mark.parametrize("effort", list(LEVELS))
def test_reasoning_effort_reaches_the_template_as_one_of_three_levels(
        harmony_server, tokenizer, effort) -> None:
    prompt = rendered(harmony_server, tokenizer, reasoning_effort=effort)
    assert f"Reasoning: {LEVELS[effort]}\n" in prompt


def test_chat_template_kwargs_override_the_native_effort(harmony_server, tokenizer) -> None:
    prompt = rendered(harmony_server, tokenizer, reasoning_effort="high",
                      chat_template_kwargs={"reasoning_effort": "low"})
    assert "Reasoning: low\n" in prompt


def test_tokenize_renders_exactly_the_prompt_chat_sends(
        client, harmony_server, model, tokenizer) -> None:
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                             reasoning_effort="high", tokenize=False)
    assert rendered(harmony_server, tokenizer, reasoning_effort="high") == expected
    resp = chat(client, model, reasoning_effort="high", max_tokens=1)
    assert resp.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))


def rendered(server, tokenizer, **body) -> str:
    """The prompt /tokenize renders for QUESTION, special tokens included."""
    resp = server.post("/tokenize", json={"messages": QUESTION, **body})
    assert resp.status_code == 200, resp.text
    return tokenizer.decode(resp.json()["tokens"])
