"""/v1/chat/completions through the official openai SDK against a real server process.
Prompt rendering is checked against transformers' apply_chat_template token for token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.api.conftest import MODEL

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [{"role": "system", "content": "You answer in one short sentence."},
              {"role": "user", "content": "Name a color."},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Name another one, 日本語でも."}]


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def chat(client, messages=QUESTION, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": messages,
                                             "max_tokens": 10, "temperature": 0, **kwargs})


@pytest.mark.parametrize("messages", [QUESTION, MULTI_TURN], ids=["plain", "multi_turn"])
def test_prompt_is_the_chat_template_of_transformers(client, server, hf_tokenizer,
                                                     messages) -> None:
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                return_dict=False)
    assert chat(client, messages).usage.prompt_tokens == len(expected)
    assert server.post("/tokenize", json={"messages": messages}).json()["tokens"] == expected


def test_plain_chat_answers_as_the_assistant(client) -> None:
    resp = chat(client, max_tokens=20)
    assert resp.object == "chat.completion" and resp.model == MODEL
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"    # ended at <|im_end|>, not cut off
    assert resp.usage.completion_tokens <= 20


def test_text_content_parts_are_joined(client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    assert chat(client, parts).choices[0].message.content == \
        chat(client, joined).choices[0].message.content


def test_max_completion_tokens_wins_over_max_tokens(client) -> None:
    resp = chat(client, max_tokens=3, max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"


def test_continue_final_message_prefills_the_answer(client, server, hf_tokenizer) -> None:
    messages = QUESTION + [{"role": "assistant", "content": "The capital of France is"}]
    expected = hf_tokenizer.apply_chat_template(messages, continue_final_message=True,
                                                return_dict=False)
    resp = chat(client, messages, extra_body={"add_generation_prompt": False,
                                              "continue_final_message": True})
    assert resp.usage.prompt_tokens == len(expected)
    assert "Paris" in resp.choices[0].message.content


def test_logprobs_in_the_chat_shape(client) -> None:
    resp = chat(client, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)   # greedy
    assert "".join(e.token for e in content).startswith(resp.choices[0].message.content)


def test_no_logprobs_unless_asked(client) -> None:
    assert chat(client).choices[0].logprobs is None


@pytest.mark.parametrize("n", [1, 2])
def test_stream_joins_to_the_non_streamed_message(client, n) -> None:
    kwargs = dict(n=n, temperature=0.9, seed=3, max_tokens=12)
    full = chat(client, MULTI_TURN, **kwargs)
    chunks = list(chat(client, MULTI_TURN, stream=True, **kwargs))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    for i in range(n):
        deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in chunks
                  if c.choices[0].index == i]
        first, *rest = deltas
        assert first[0].role == "assistant" and first[0].content == ""
        assert all(d.role is None for d, _ in rest)
        assert rest[-1][1] == full.choices[i].finish_reason
        assert all(reason is None for _, reason in deltas[:-1])
        assert "".join(d.content or "" for d, _ in rest) == full.choices[i].message.content


def test_stream_usage_chunk_only_with_include_usage(client) -> None:
    plain = list(chat(client, stream=True))
    assert all(c.usage is None for c in plain)
    *body, last = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert last.choices == [] and all(c.usage is None for c in body)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_stream_with_logprobs_covers_every_token(client) -> None:
    full = chat(client, logprobs=True, max_tokens=8, extra_body={"ignore_eos": True})
    chunks = list(chat(client, stream=True, logprobs=True, max_tokens=8,
                       extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == \
        [(e.token, e.logprob) for e in full.choices[0].logprobs.content]


def test_prefix_cache_hits_show_as_cached_tokens(client) -> None:
    chat(client, MULTI_TURN, max_tokens=1)
    again = chat(client, MULTI_TURN, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= again.usage.prompt_tokens
