"""Hostile requests against a real server: every one a 4xx in the OpenAI error shape that
names the problem, each bound of api.limits and each range exact at its edge. Through the
openai SDK where it can send the request, raw HTTP where it cannot (Infinity, huge or
deep bodies, lone surrogates)."""

from __future__ import annotations

import json

import openai
import pytest

from api import limits
from tests.api.conftest import MODEL
from tests.api.test_errors import assert_error_shape

pytestmark = pytest.mark.model

VOCAB = 49152   # SmolLM2's: the config's vocab_size and len(tokenizer) agree
OK = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 0}


def post_raw(server, body: bytes, path: str = "/v1/completions"):
    return server.post(path, data=body)


def assert_400(resp, *words: str, param: str | None = None) -> dict:
    assert resp.status_code == 400, resp.text
    error = assert_error_shape(resp.json())
    assert all(word in error["message"] for word in words), error["message"]
    assert param is None or error["param"] == param
    return error


def completion_error(client, **fields) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, max_tokens=1, **{"prompt": "hi", **fields})
    return info.value


def padded(size: int) -> bytes:
    """A valid completion body of exactly `size` bytes (an unknown field pads it)."""
    head = json.dumps({**OK, "pad": ""}).encode()
    return head[:-2] + b"x" * (size - len(head)) + b'"}'


def test_a_body_at_the_limit_is_served_and_one_byte_more_is_a_413(server) -> None:
    assert post_raw(server, padded(limits.MAX_BODY_BYTES)).status_code == 200
    resp = post_raw(server, padded(limits.MAX_BODY_BYTES + 1))
    assert resp.status_code == 413
    assert "8 MiB" in assert_error_shape(resp.json())["message"]


def test_a_chunked_body_over_the_limit_is_a_413_in_the_error_shape(server) -> None:
    chunks = (b"x" * (1 << 20) for _ in range(limits.MAX_BODY_BYTES // (1 << 20) + 2))
    resp = server.post("/v1/completions", data=chunks)   # no Content-Length
    assert resp.status_code == 413 and assert_error_shape(resp.json())


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [limits.MAX_JSON_DEPTH, 100_000])
def test_a_body_nested_too_deep_is_a_400_naming_the_nesting(server, depth) -> None:
    body = json.dumps(OK)[:-1] + f', "extra": {nested(depth)}}}'
    assert_400(post_raw(server, body.encode()), "nests", str(limits.MAX_JSON_DEPTH))


def test_nesting_up_to_the_limit_is_accepted(server) -> None:
    body = json.dumps(OK)[:-1] + f', "extra": {nested(limits.MAX_JSON_DEPTH - 1)}}}'
    assert post_raw(server, body.encode()).status_code == 200


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty",
                                   "presence_penalty", "frequency_penalty", "min_p"])
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_a_400_naming_the_field(server, field, value) -> None:
    body = json.dumps(OK)[:-1] + f', "{field}": {value}}}'
    assert_400(post_raw(server, body.encode()), field, param=field)


def test_a_non_finite_logit_bias_is_a_400(server) -> None:
    body = json.dumps(OK)[:-1] + ', "logit_bias": {"5": Infinity}}'
    assert_400(post_raw(server, body.encode()), "logit_bias", param="logit_bias")


@pytest.mark.parametrize("fields", [
    {"temperature": 2.5}, {"seed": 2**63}, {"seed": -2**63 - 1}, {"seed": 10**29},
    {"top_k": 2**31}, {"repetition_penalty": 0}, {"presence_penalty": -2.5},
    {"frequency_penalty": 3}, {"logit_bias": {"5": -101}},
], ids=str)
def test_numbers_outside_the_openai_ranges_are_a_400_naming_the_field(client, fields) -> None:
    (field, _), = fields.items()
    assert completion_error(client, extra_body=fields).body["param"] == field


def test_the_edges_of_the_ranges_are_served(client) -> None:
    resp = client.completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature=2,
                                     seed=2**63 - 1, presence_penalty=-2, frequency_penalty=2,
                                     logit_bias={"5": -100, "6": 100})
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.parametrize("fields", [
    {"prompt": [-1]}, {"prompt": [VOCAB]}, {"prompt": [[5], [10**30]]},
    {"extra_body": {"stop_token_ids": [VOCAB]}}, {"extra_body": {"stop_token_ids": [-1]}},
    {"logit_bias": {str(VOCAB): 1}}, {"logit_bias": {"-1": 1}},
], ids=str)
def test_token_ids_past_the_vocabulary_are_a_400(client, fields) -> None:
    error = completion_error(client, **fields)
    assert f"[0, {VOCAB})" in error.body["message"]


def test_token_ids_at_the_edges_of_the_vocabulary_are_served(client) -> None:
    resp = client.completions.create(model=MODEL, prompt=[0, VOCAB - 1], max_tokens=2,
                                     logit_bias={str(VOCAB - 1): 1}, echo=True,
                                     extra_body={"stop_token_ids": [0, VOCAB - 1]})
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_detokenize_takes_only_ids_the_tokenizer_knows(server) -> None:
    assert server.post("/detokenize", json={"tokens": [VOCAB - 1]}).status_code == 200
    for tokens in ([VOCAB], [-1], [10**30]):
        assert_400(server.post("/detokenize", json={"tokens": tokens}), str(VOCAB),
                   param="tokens")


@pytest.mark.parametrize("fields, param", [
    ({"stop": ["x"] * (limits.MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (limits.MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"extra_body": {"stop_token_ids": [5] * (limits.MAX_STOP_TOKEN_IDS + 1)}},
     "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"prompt": ["hi"] * (limits.MAX_PROMPTS + 1)}, "prompt"),
    ({"prompt": ["hi"] * 9, "n": limits.MAX_CHOICES // 8}, "n"),   # 9 x 128 choices
    ({"n": limits.MAX_N + 1}, "n"),
], ids=["stop", "stop_length", "stop_token_ids", "logit_bias", "prompts", "choices", "n"])
def test_lists_over_their_bound_are_a_400_naming_the_field(client, fields, param) -> None:
    error = completion_error(client, **fields)
    assert error.body["param"] == param and error.status_code == 400


def test_lists_at_their_bound_are_served(client) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="hi", max_tokens=1,
        stop=[f"s{i}" for i in range(limits.MAX_STOP_STRINGS - 1)]
        + ["x" * limits.MAX_STOP_STRING_CHARS],
        logit_bias={str(i): 0 for i in range(limits.MAX_LOGIT_BIAS)},
        extra_body={"stop_token_ids": list(range(limits.MAX_STOP_TOKEN_IDS))})
    assert len(resp.choices) == 1


def chat_error(client, messages, **fields) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **fields)
    return info.value


@pytest.mark.parametrize("role", ["wizard", "function", "", "USER"])
def test_unknown_roles_are_a_400_listing_the_roles(client, role) -> None:
    error = chat_error(client, [{"role": role, "content": "hi"}])
    assert "system, developer, user, assistant, tool" in error.body["message"]


def test_the_developer_role_is_served(client) -> None:
    resp = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "f"}},
], ids=lambda part: part["type"])
def test_content_parts_other_than_text_are_a_400_saying_text_only(client, server, part) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "see:"}, part]}]
    assert "serves text only" in chat_error(client, messages).body["message"]
    resp = server.post("/tokenize", json={"messages": messages})
    assert_400(resp, "serves text only", param="messages")


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "hi", "name": {"a": 1}},
    {"role": "assistant", "content": None, "tool_calls": 5},
    {"role": "assistant", "content": "x", "reasoning_content": ["r"]},
], ids=["name", "tool_calls", "reasoning_content"])
def test_message_fields_of_the_wrong_type_are_a_400_naming_them(client, message) -> None:
    field = next(k for k in message if k not in ("role", "content"))
    assert field in chat_error(client, [message]).body["message"]


def test_too_many_messages_or_tools_are_a_400(client) -> None:
    messages = [{"role": "user", "content": "hi"}] * (limits.MAX_MESSAGES + 1)
    assert chat_error(client, messages).body["param"] == "messages"
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    error = chat_error(client, [{"role": "user", "content": "hi"}],
                       tools=[tool] * (limits.MAX_TOOLS + 1))
    assert error.body["param"] == "tools"


@pytest.mark.parametrize("field", ["prompt", "model", "stop", "user"])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, field) -> None:
    body = json.dumps({**OK, field: "a\ud800b"}).encode()   # json writes it as \\ud800
    assert_400(post_raw(server, body), "surrogate", param=field)


def test_a_surrogate_pair_is_text(server) -> None:
    body = json.dumps({**OK, "prompt": "smile \U0001F642"}).encode()   # \\ud83d\\ude42
    assert post_raw(server, body).status_code == 200


@pytest.mark.parametrize("name", ["a" * 5000, "tinker://" + "r" * 300 + "/sampler_weights/x"])
def test_a_model_name_too_long_for_the_filesystem_is_a_404(client, name) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="hi", max_tokens=1)


def test_a_completion_without_a_prompt_is_a_400(server) -> None:
    assert_400(server.post("/v1/completions", json={"model": MODEL}), "prompt", param="prompt")
