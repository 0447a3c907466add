"""The reasoning format, and the thinking budget that follows from it, are those of the
template that renders the request: of a model's named templates, `tools` picks
`tool_use`. Here only `tool_use` opens a trace. Flask's test client over a tiny engine."""

from __future__ import annotations

import math
import shutil

import pytest
from transformers import AutoTokenizer

from api import create_app
from api.state import ServerConfig
from engine import Engine
from engine.text.think_tags import THINK_TAGS
from tests.engine.text.test_reasoning import CHATML, R1_STYLE_TEMPLATE

PLAIN_TEMPLATE = (CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                  "{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def engine(tiny_model_dirs, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("named-templates") / "model"
    shutil.copytree(tiny_model_dirs["llama-gqa-untied"], model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir)
    hf.chat_template = {"default": PLAIN_TEMPLATE, "tool_use": R1_STYLE_TEMPLATE}
    hf.save_pretrained(model_dir)
    eng = Engine(model_dir, block_size=4, num_kv_blocks=64, progress=False)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def http(engine):
    return create_app(engine, ServerConfig()).test_client()


def chat(http, **fields):
    return http.post("/v1/chat/completions", json={
        "model": "model", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, **fields})


def test_with_tools_the_tool_use_template_opens_the_trace_and_its_budget_applies(http, engine):
    resp = chat(http, tools=TOOLS, reasoning_effort=0.25)
    assert resp.status_code == 200, resp.json
    allowed = math.ceil(0.25 * MAX_TOKENS)
    tokens = [entry["token"] for entry in resp.json["choices"][0]["logprobs"]["content"]]
    marker = len(engine.tokenizer.encode(THINK_TAGS.forced_end, add_special_tokens=False))
    assert "".join(tokens[allowed:allowed + marker]) == THINK_TAGS.forced_end
    assert resp.json["choices"][0]["message"]["reasoning_content"]
    assert resp.json["usage"]["completion_tokens_details"]["reasoning_tokens"] >= allowed


def test_without_tools_the_default_template_writes_no_trace(http):
    resp = chat(http, reasoning_effort=0.25)
    assert resp.status_code == 400 and "does not support reasoning_effort" in \
        resp.json["error"]["message"]
    message = chat(http).json["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] is not None
