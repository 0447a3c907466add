"""parse_request's checks of the raw body, without a server: nesting depth and text, at
the edges, wherever in the body they are (the API tests send the same over HTTP)."""

from __future__ import annotations

import json

import pytest

from api.errors import APIError
from api.limits import MAX_JSON_DEPTH
from api.protocol import ChatCompletionRequest, CompletionRequest, parse_request

BODY = {"model": "m", "prompt": "hi"}


def nest(value, levels: int):
    for _ in range(levels):
        value = [value]
    return value


def parse(**extra) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({**BODY, **extra}).encode())


@pytest.mark.parametrize("inner", [[1, 2.5, None, True], [], {"k": [0]}], ids=str)
def test_nesting_to_the_limit_is_accepted_and_one_more_level_is_a_400(inner) -> None:
    # The body is level 1; `inner` is one more level, and so is each list around it.
    levels = MAX_JSON_DEPTH - 2 - (1 if isinstance(inner, dict) else 0)
    assert parse(extra=nest(inner, levels)).prompt == "hi"
    with pytest.raises(APIError, match="more than 64 levels deep") as info:
        parse(extra=nest(inner, levels + 1))
    assert info.value.status == 400 and info.value.param == "extra"


def test_a_body_too_deep_for_the_json_parser_is_the_same_400() -> None:
    raw = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(APIError, match="more than 64 levels deep"):
        parse_request(CompletionRequest, raw)


@pytest.mark.parametrize("extra", [
    {"user": "a\udc00"}, {"stop": ["ok", "\ud800"]}, {"tools_like": {"\udfff": 1}},
    {"deep": nest([1, 2, "x\ud9ff"], 10)},
], ids=["string", "in_list", "dict_key", "nested_among_numbers"])
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_top_level_field(extra) -> None:
    with pytest.raises(APIError, match="lone UTF-16 surrogate") as info:
        parse(**extra)
    assert info.value.param == next(iter(extra))


def test_surrogate_pairs_are_text() -> None:
    assert parse(prompt="\U0001F642").prompt == "\U0001F642"   # json writes \ud83d\ude42


def chat_history(arguments) -> list[dict]:
    return [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]}]


@pytest.mark.parametrize("arguments, read", [
    ('{"city": "Paris", "days": 3}', {"city": "Paris", "days": 3}),
    ({"city": "Paris"}, {"city": "Paris"}), ("", {}), (None, {})])
def test_history_call_arguments_reach_the_template_as_an_object(arguments, read) -> None:
    body = {"model": "m", "messages": chat_history(arguments)}
    req = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    call = req.messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": read}
    assert call["id"] == "call_1"


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", "3", ["city"]])
def test_history_call_arguments_that_are_not_an_object_are_a_400(arguments) -> None:
    body = {"model": "m", "messages": chat_history(arguments)}
    with pytest.raises(APIError, match=r"messages\[1\].tool_calls\[0\].function.arguments") \
            as info:
        parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert info.value.status == 400
