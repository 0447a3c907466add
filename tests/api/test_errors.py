"""Every error class through the openai SDK (its exception per status) and raw HTTP
(what the SDK cannot send): OpenAI error shape, right status, never 422."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.api.conftest import API_KEY, MODEL

pytestmark = pytest.mark.model


def assert_error_shape(body: dict) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"stop": 5}, "stop"),
    ({"n": 0}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                  extra_body=fields)
    error = assert_error_shape(info.value.body if "error" in info.value.body
                               else {"error": info.value.body})
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, match", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"continue_final_message": True}, "cannot both be true"),
    ({"chat_template_kwargs": {"tools": []}}, "may not set tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "content parts"),
])
def test_bad_chat_fields_are_400(client, fields, match) -> None:
    messages = fields.pop("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       extra_body=fields)


def test_context_overflow_names_both_numbers(client, server) -> None:
    prompt = "word " * 1500
    n_prompt = len(server.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1000)
    message = info.value.body["message"]
    assert "2048" in message and str(n_prompt + 1000) in message


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tinker://run/sampler_weights/none",
                                       messages=[{"role": "user", "content": "hi"}])


def test_checkpoint_path_leaving_the_root_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="`..`"):
        client.completions.create(model="tinker://../sampler_weights/x", prompt="hi")


def test_wrong_api_key_is_an_authentication_error(server) -> None:
    bad = openai.OpenAI(base_url=server.v1, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY + "x"])
def test_missing_or_wrong_api_key_is_401(server, key) -> None:
    resp = server.post("/v1/completions", key=key, json={"model": MODEL, "prompt": "hi"})
    assert resp.status_code == 401
    assert assert_error_shape(resp.json())["code"] == "invalid_api_key"


def test_health_metrics_and_tokenize_need_no_key(server) -> None:
    assert requests.get(f"{server.url}/health").json() == {"status": "ok"}
    assert requests.get(f"{server.url}/metrics").status_code == 200
    assert server.post("/tokenize", key=None, json={"prompt": "hi"}).status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_unreadable_body_is_400(server, body) -> None:
    resp = server.post("/v1/completions", data=body)
    assert resp.status_code == 400
    assert_error_shape(resp.json())


def test_unknown_route_and_wrong_method_keep_the_error_shape(server) -> None:
    resp = requests.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 404 and assert_error_shape(resp.json())
    resp = requests.get(f"{server.url}/v1/completions",
                        headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 405 and assert_error_shape(resp.json())


def test_tokenize_and_detokenize_round_trip_and_refuse_bad_ids(server) -> None:
    tokens = server.post("/tokenize", json={"prompt": "héllo wörld"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    assert server.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == \
        {"prompt": "héllo wörld"}
    assert server.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert server.post("/tokenize", json={}).status_code == 400
