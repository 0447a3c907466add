"""Property-based fuzzing of the HTTP API, with hypothesis, against a real server.

Each example is a body drawn from one endpoint's request schema (small, so that a valid
one costs a decode step or two), then mutated: fields set to wrong types, out-of-range
and non-finite numbers, huge and empty values, deep nesting, token ids at and past the
vocabulary's edges, model names from the path-traversal family, unknown fields; and
the serialized bytes perhaps broken: invalid UTF-8, a lone surrogate, Infinity, a cut.

The property: every response is a 200 with a valid body (strict JSON; a stream of JSON
events ending in [DONE], none of them a server error) or a 4xx with an OpenAI error
body, never a 5xx. After the run `/health` is ok, a normal request gets the answer it
got before, and no KV block is in use.

Bounded for CI: a fixed (derandomized) sequence of 100 examples. A longer run:
`POKESERVE_FUZZ_EXAMPLES=5000 pytest tests/api/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tqdm import tqdm

from api import limits
from api.protocol import ROLES
from tests.api.conftest import MODEL
from tests.api.test_errors import assert_error_shape

pytestmark = pytest.mark.model

EXAMPLES = int(os.environ.get("POKESERVE_FUZZ_EXAMPLES", "100"))
VOCAB = 49152
EDGE_IDS = [-1, 0, VOCAB - 1, VOCAB, VOCAB + 1, 2**31, 2**63, -2**63 - 1, 10**30]
MODEL_NAMES = [
    "", " ", "..", "../x", "/", "/etc/passwd", "~", "%2e%2e%2f", "a\x00b", "a" * 5000,
    "tinker://", "tinker://../../etc/sampler_weights/x", "tinker://r/sampler_weights/..",
    "tinker://r/other/x", "tinker://r/sampler_weights/x/y", "tinker://r//x",
    "tinker://" + "r" * 300 + "/sampler_weights/x", "tinker://r/sampler_weights/000010",
    "tinker://broken:train:0/sampler_weights/nan",   # NaN factors, once test_models made it
    MODEL + "/..", MODEL.lower(),
]
NUMERIC_FIELDS = ["temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "n", "min_tokens", "logprobs",
                  "top_logprobs", "reasoning_effort", "max_tokens"]
FIELDS = NUMERIC_FIELDS + [
    "model", "prompt", "messages", "stop", "stop_token_ids", "logit_bias", "ignore_eos",
    "skip_special_tokens", "include_stop_str_in_output", "stream", "stream_options", "echo",
    "user", "tools", "tool_choice", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "separate_reasoning", "response_format", "tokens",
    "add_special_tokens",
    "max_completion_tokens", "no_such_field", "__class__", "",
]

ints = st.integers(0, VOCAB - 1)
token_ids = st.lists(st.one_of(ints, st.sampled_from(EDGE_IDS)), min_size=1, max_size=5)
text = st.text(max_size=12)
unit = st.floats(0.0, 1.0)
sampling = {
    "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(-1, 50), "min_p": unit, "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=4),
                      st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(ints, max_size=3), "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0), "repetition_penalty": st.floats(0.5, 2.0),
    "logit_bias": st.dictionaries(ints.map(str), st.floats(-100.0, 100.0), max_size=3),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 1), "n": st.integers(1, 2),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans()}), "user": text,
}
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.one_of(
    text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                   max_size=2))})
messages = st.lists(message, min_size=1, max_size=3)
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text, "parameters": st.just({"type": "object"})})})

ENDPOINTS = {
    "/v1/completions": st.fixed_dictionaries(
        {"model": st.just(MODEL), "max_tokens": st.integers(1, 2),
         "prompt": st.one_of(text, st.lists(text, min_size=1, max_size=3), token_ids,
                             st.lists(token_ids, min_size=1, max_size=2))},
        optional={**sampling, "logprobs": st.integers(0, 3), "echo": st.booleans()}),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"model": st.just(MODEL), "max_tokens": st.integers(1, 2), "messages": messages},
        optional={**sampling, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
                  "max_completion_tokens": st.integers(1, 2),
                  "chat_template_kwargs": st.dictionaries(text, st.booleans(), max_size=2),
                  "add_generation_prompt": st.booleans(),
                  "continue_final_message": st.booleans(),
                  "separate_reasoning": st.booleans(),
                  "reasoning_effort": st.sampled_from(["low", "high", 0.5]),
                  "tools": st.lists(tool, max_size=2),
                  "tool_choice": st.sampled_from(["auto", "none", "required", {"x": 1}, 3]),
                  "response_format": st.just({"type": "json_object"})}),
    "/tokenize": st.one_of(
        st.fixed_dictionaries({"prompt": text}, optional={"add_special_tokens": st.booleans()}),
        st.fixed_dictionaries({"messages": messages},
                              optional={"add_generation_prompt": st.booleans(),
                                        "model": st.just(MODEL)})),
    "/detokenize": st.fixed_dictionaries({"tokens": token_ids}),
}


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(EDGE_IDS),
    st.floats(allow_nan=True, allow_infinity=True), text, st.sampled_from(MODEL_NAMES),
    st.lists(st.one_of(st.integers(-5, VOCAB + 5), text, st.none()), max_size=4),
    st.dictionaries(text, st.one_of(st.integers(), text), max_size=3),
    st.sampled_from(["", [], {}, [[]], [{}], {"": None}]),
    st.sampled_from(["x" * 50_000, [7] * 5000, ["x"] * (limits.MAX_PROMPTS + 1),
                     {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}]),
    st.sampled_from([nested(limits.MAX_JSON_DEPTH - 1), nested(limits.MAX_JSON_DEPTH + 2)]),
    st.lists(message, min_size=1, max_size=2),
    st.just([{"type": "image_url", "image_url": {"url": "x"}}]),
)


@st.composite
def mutated(draw, body: dict) -> dict:
    """`body` with up to three fields set to hostile values or deleted, perhaps inside a
    chat message; the valid results stay cheap to serve."""
    body = json.loads(json.dumps(body))   # a copy
    for _ in range(draw(st.integers(0, 3))):
        target = body
        if body.get("messages") and isinstance(body["messages"], list) and draw(st.booleans()):
            target = draw(st.sampled_from([m for m in body["messages"] if isinstance(m, dict)]
                                          or [body]))
            key = draw(st.sampled_from(["role", "content", "name", "tool_calls",
                                        "reasoning_content", "extra"]))
        else:
            key = draw(st.sampled_from(FIELDS))
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(hostile)
    return keep_cheap(body)


def keep_cheap(body: dict) -> dict:
    """A token limit or `n` that the mutations made valid and large (or took away) is
    brought back to a small one: the suite tests refusals, not long generations."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if "max_tokens" not in body or body["max_tokens"] is None \
            or is_int(body["max_tokens"]) and 2 < body["max_tokens"] < 10_000:
        body["max_tokens"] = 2
    if is_int(body.get("max_completion_tokens")) and 2 < body["max_completion_tokens"] < 10_000:
        body["max_completion_tokens"] = 2
    if is_int(body.get("n")) and 4 < body["n"] <= limits.MAX_N:
        body["n"] = 4
    return body


@st.composite
def raw_body(draw, body: dict) -> bytes:
    """The JSON text of `body`, perhaps broken on the wire."""
    data = json.dumps(body).encode()   # json writes NaN and Infinity for those floats
    rest = data[1:] if len(data) > 2 else b"}"
    kind = draw(st.sampled_from(["json"] * 6 + ["utf8", "surrogate", "constant", "cut",
                                                "deep", "not_object"]))
    if kind == "utf8":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + data[at:]
    if kind == "surrogate":
        return b'{"' + draw(st.sampled_from(FIELDS)).encode() + b'": "a\\udc00", ' + rest
    if kind == "constant":
        field = draw(st.sampled_from(NUMERIC_FIELDS)).encode()
        value = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0"]))
        return b'{"' + field + b'": ' + value + b", " + rest
    if kind == "cut":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "deep":
        depth = draw(st.sampled_from([limits.MAX_JSON_DEPTH + 1, 5000, 200_000]))
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b", " + rest
    if kind == "not_object":
        return draw(st.sampled_from([b"[]", b"null", b"1", b'"x"', b""]))
    return data


def request():
    return st.sampled_from(sorted(ENDPOINTS)).flatmap(lambda path: ENDPOINTS[path].flatmap(
        mutated).flatmap(raw_body).map(lambda body: (path, body)))


def strict_json(data: bytes):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(data, parse_constant=refuse)


def check_ok(path: str, body: dict) -> None:
    if path == "/v1/completions":
        assert body["object"] == "text_completion" and body["choices"]
        assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length")
                   for c in body["choices"])
    elif path == "/v1/chat/completions":
        assert body["object"] == "chat.completion" and body["choices"]
        assert all(c["message"]["role"] == "assistant" and isinstance(
            c["message"]["content"], str) for c in body["choices"])
    elif path == "/tokenize":
        assert body["count"] == len(body["tokens"]) and all(
            0 <= t < VOCAB for t in body["tokens"])
    else:
        assert isinstance(body["prompt"], str)


def check_stream(text: str) -> None:
    events = [e for e in text.split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", text[-300:]
    for sse in events[:-1]:
        payload = strict_json(sse.removeprefix("data: ").encode())
        if "error" in payload:   # sent after the 200: it must still be the client's fault
            assert assert_error_shape(payload)["type"] != "server_error", payload
        else:
            assert payload["object"].endswith(".chunk") or payload["object"] == \
                "text_completion", payload


def check_response(path: str, resp) -> None:
    assert resp.status_code < 500, resp.text[:1000]
    if resp.status_code != 200:
        assert 400 <= resp.status_code < 500
        assert_error_shape(strict_json(resp.content))
    elif resp.headers["Content-Type"].startswith("text/event-stream"):
        check_stream(resp.text)
    else:
        check_ok(path, strict_json(resp.content))


def greedy_answer(client) -> str:
    return client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=4, temperature=0).choices[0].text


def test_hostile_requests_get_a_valid_body_or_a_4xx_and_leave_the_server_healthy(
        server, client) -> None:
    before = greedy_answer(client)
    progress = tqdm(total=EXAMPLES, desc="fuzz", disable=EXAMPLES <= 100)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request())
    def property_holds(example: tuple[str, bytes]) -> None:
        path, body = example
        resp = server.post(path, data=body)
        event(f"{path} {resp.status_code}")   # pytest --hypothesis-show-statistics
        check_response(path, resp)
        progress.update()

    property_holds()
    progress.close()
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    assert greedy_answer(client) == before
    deadline = time.monotonic() + 30   # aborts of hung-up streams arrive through the inbox
    while server.metric("pokeserve_kv_cache_blocks_used") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("pokeserve_kv_cache_blocks_used") == 0
    assert server.metric("pokeserve_num_requests_running") == 0
