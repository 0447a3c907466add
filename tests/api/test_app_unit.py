"""HTTP-layer behaviour that needs no model run: readiness, auth, template refusal, and
an error in the middle of a stream. Flask's test client, no server process."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from api import create_app
from api.chat import render_prompt
from api.errors import APIError
from api.sse import DONE, sse_response
from api.state import ServerConfig
from engine.text.tokenizer import Tokenizer

COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 2}


@pytest.fixture
def loading_app():
    return create_app(None, ServerConfig(api_keys=("k1", "k2")))


def test_health_is_503_while_the_engine_loads(loading_app) -> None:
    resp = loading_app.test_client().get("/health")
    assert resp.status_code == 503 and resp.json == {"status": "loading"}


def test_generation_is_503_in_the_error_shape_while_loading(loading_app) -> None:
    resp = loading_app.test_client().post("/v1/completions", json=COMPLETION,
                                          headers={"Authorization": "Bearer k2"})
    assert resp.status_code == 503
    assert resp.json["error"]["code"] == "model_loading"


def test_validation_comes_before_readiness(loading_app) -> None:
    resp = loading_app.test_client().post("/v1/completions", json={**COMPLETION, "n": "2"},
                                          headers={"Authorization": "Bearer k1"})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "n"


@pytest.mark.parametrize("header", [None, "Bearer k3", "Basic k1", "Bearer "])
def test_v1_routes_need_one_of_the_keys(loading_app, header) -> None:
    headers = {"Authorization": header} if header else {}
    resp = loading_app.test_client().post("/v1/completions", json=COMPLETION, headers=headers)
    assert resp.status_code == 401 and resp.json["error"]["code"] == "invalid_api_key"


@pytest.mark.model
def test_model_without_chat_template_is_a_clear_400(default_model_dir, tmp_path) -> None:
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    hf.chat_template = None
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(APIError) as info:
        render_prompt(Tokenizer(tmp_path), [{"role": "user", "content": "hi"}], {})
    assert info.value.status == 400 and "/v1/completions" in info.value.message


class _FakeGeneration:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_error_after_the_stream_started_is_an_error_event_then_done() -> None:
    def events():
        yield {"choices": [{"text": "Hel"}]}
        raise APIError(500, "generation failed: boom")

    gen = _FakeGeneration()
    body = list(sse_response(events(), gen).response)
    assert json.loads(body[0].removeprefix("data: ")) == {"choices": [{"text": "Hel"}]}
    error = json.loads(body[1].removeprefix("data: "))["error"]
    assert error["message"] == "generation failed: boom" and error["type"] == "server_error"
    assert body[2:] == [DONE] and gen.aborted


def test_closing_a_stream_early_aborts_its_sequences() -> None:
    gen = _FakeGeneration()
    body = sse_response(iter([{"a": 1}, {"a": 2}]), gen).response
    next(body)
    body.close()   # what the WSGI server does when the client hangs up
    assert gen.aborted
