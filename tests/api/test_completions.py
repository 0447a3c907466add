"""/v1/completions through the official openai SDK against a real server process."""

from __future__ import annotations

import pytest

from tests.api.conftest import MODEL

pytestmark = pytest.mark.model

PROMPT = "Count with me: one, two, three,"
OMIT = object()   # leave the field out of the request


def complete(client, **kwargs):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **kwargs}
    return client.completions.create(**{k: v for k, v in args.items() if v is not OMIT})


def test_text_prompt_returns_text_usage_and_finish_reason(client) -> None:
    resp = complete(client)
    assert resp.object == "text_completion" and resp.model == MODEL
    (choice,) = resp.choices
    assert choice.text and choice.finish_reason == "length" and choice.index == 0
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_default_max_tokens_is_16(client) -> None:
    resp = complete(client, max_tokens=OMIT, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16


def test_token_id_prompt_gives_the_same_completion_as_its_text(client, server) -> None:
    ids = server.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert complete(client, prompt=ids).choices[0].text == complete(client).choices[0].text


def test_batch_of_prompts_orders_choices_prompt_major(client) -> None:
    prompts = [PROMPT, "The capital of France is"]
    singles = [complete(client, prompt=p).choices[0].text for p in prompts]
    resp = complete(client, prompt=prompts, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [singles[0], singles[0], singles[1], singles[1]]
    prompt_lens = [complete(client, prompt=p).usage.prompt_tokens for p in prompts]
    assert resp.usage.prompt_tokens == sum(prompt_lens)   # each prompt counted once


def test_n_samples_with_a_seed_are_reproducible_and_differ(client) -> None:
    kwargs = dict(n=3, temperature=1.0, seed=1234, max_tokens=12)
    first, second = complete(client, **kwargs), complete(client, **kwargs)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert len(set(texts)) > 1   # each sample draws from its own stream


def test_echo_puts_the_prompt_in_front(client) -> None:
    plain = complete(client).choices[0].text
    assert complete(client, echo=True).choices[0].text == PROMPT + plain


def test_logprobs_shape_and_greedy_choice_is_the_top_alternative(client) -> None:
    resp = complete(client, logprobs=3)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == max(top.values()) and logprob <= 0


def test_echo_with_logprobs_scores_the_prompt_first(client) -> None:
    resp = complete(client, echo=True, logprobs=1, max_tokens=4)
    lp = resp.choices[0].logprobs
    n_prompt = resp.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == resp.choices[0].text


@pytest.mark.parametrize("n", [1, 2])
def test_stream_joins_to_the_non_streamed_text(client, n) -> None:
    kwargs = dict(n=n, temperature=0.8, seed=7, max_tokens=12)
    full = complete(client, **kwargs)
    parts = {i: [] for i in range(n)}
    finish = {}
    chunks = list(complete(client, stream=True, **kwargs))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    for chunk in chunks:
        assert chunk.usage is None
        for choice in chunk.choices:
            assert choice.index not in finish   # nothing after a choice's finish_reason
            parts[choice.index].append(choice.text)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert ["".join(parts[i]) for i in range(n)] == [c.text for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}


def test_stream_usage_only_when_asked_and_last(client) -> None:
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in body)


def test_stop_string_spanning_tokens_cuts_the_text(client) -> None:
    text = complete(client, max_tokens=12).choices[0].text   # " four, five, six, ..."
    stop = text[3:9]      # straddles token boundaries
    assert len(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                         temperature=0).choices[0].text) < 9
    for stream in (False, True):
        resp = complete(client, max_tokens=12, stop=[stop, "never"], stream=stream)
        got = "".join(c.choices[0].text for c in resp) if stream else resp.choices[0].text
        assert got == text[:3]
    included = complete(client, max_tokens=12, stop=stop,
                        extra_body={"include_stop_str_in_output": True})
    assert included.choices[0].text == text[:9]
    assert included.choices[0].finish_reason == "stop"


def test_stop_token_ids_end_the_completion(client, server) -> None:
    text = complete(client, max_tokens=6).choices[0].text
    comma = server.post("/tokenize", json={"prompt": ","}).json()["tokens"]
    resp = complete(client, max_tokens=6, extra_body={"stop_token_ids": comma})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == text[:text.index(",")]


def test_unknown_fields_are_ignored(client) -> None:
    plain = complete(client).choices[0].text
    assert complete(client, extra_body={"no_such_field": 1, "best_of": 1}).choices[0].text == plain


def test_stream_with_echo_starts_with_the_prompt(client) -> None:
    full = complete(client, echo=True, logprobs=1).choices[0]
    chunks = list(complete(client, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert streamed == full.logprobs.tokens


def test_stream_chunks_arrive_while_the_sequence_still_runs(client, server) -> None:
    stream = complete(client, max_tokens=300, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text   # a token's text, sent before the other 299 exist
    assert server.metric("pokeserve_num_requests_running") == 1
    stream.close()
