"""Tool calls through the openai SDK: a call the model makes comes back in `tool_calls`,
whole or streamed, with finish_reason "tool_calls"; tool_choice "none" leaves it in the
content; what pokeserve cannot honour is a 400 naming the field.

The model is a tiny gpt-oss scripted to answer every prompt with one harmony call,
`get_weather({"location": "Paris"})`, and to end it with `<|call|>` (the harmony
template in use, detected from what it renders, picks the `openai` format); the calls
and content expected follow from the script. Its header's words and the arguments are a
token each, so that no token of the script repeats (a scripted model's next token
depends on its last one only).
"""

from __future__ import annotations

import json

import openai
import pytest

from api import create_app
from api.chat import _Chat
from api.cli import build_parser
from api.generation import Generation
from api.metrics import Metrics
from api.protocol import ChatCompletionRequest
from api.state import ServerConfig
from engine import Engine, RequestOutput, SamplingParams
from engine.text.tool_calls import ToolCall
from tests.api.conftest import API_KEY, OneOutputEngine, running_server
from tests.tiny_models import save_scripted_harmony_model

CALL_HEADER = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
ARGUMENTS = '{"location": "Paris"}'
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_scripted_harmony_model(
        tmp_path_factory.mktemp("caller") / "gpt-oss", [CALL_HEADER, ARGUMENTS, "<|call|>"],
        words=("commentary", " to=functions.get_weather ", "json", ARGUMENTS))


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory) -> openai.OpenAI:
    with running_server(model_dir, tmp_path_factory.mktemp("caller-server"),
                        "--dtype", "float32") as srv:
        yield openai.OpenAI(base_url=srv.v1, api_key=API_KEY)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat(client, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                          max_tokens=60, **kwargs)


def test_a_call_comes_back_in_tool_calls_with_no_content(client, model) -> None:
    choice = chat(client, model, tools=TOOLS).choices[0]
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    assert call.id.startswith("call_")
    assert choice.message.content is None and choice.finish_reason == "tool_calls"


def test_each_choice_makes_its_own_call_with_its_own_id(client, model) -> None:
    choices = chat(client, model, tools=TOOLS, n=2).choices
    ids = [c.message.tool_calls[0].id for c in choices]
    assert [c.message.tool_calls[0].function.name for c in choices] == ["get_weather"] * 2
    assert len(set(ids)) == 2


def test_a_streamed_call_is_one_delta_and_the_stream_finishes_with_tool_calls(client,
                                                                              model) -> None:
    chunks = list(chat(client, model, tools=TOOLS, stream=True))
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    [call] = calls
    assert (call.index, call.function.name) == (0, "get_weather")
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    assert not any(chunk.choices[0].delta.content for chunk in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        "tool_calls"]


def test_with_tool_choice_none_the_call_stays_in_the_content(client, model) -> None:
    choice = chat(client, model, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == ARGUMENTS and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_without_tools_nothing_is_parsed(client, model) -> None:
    choice = chat(client, model).choices[0]
    assert choice.message.content == ARGUMENTS and choice.finish_reason == "stop"


@pytest.mark.parametrize("body, param, words", [
    (dict(tools=TOOLS, tool_choice="required"), "tool_choice", "constrained"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     "tool_choice", "constrained"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice", "must be"),
    (dict(tool_choice="auto"), "tool_choice", "only allowed when tools"),
    (dict(tools=[{"type": "retrieval"}]), "tools", "tools[0]"),
    (dict(tools=[{"type": "function", "function": {"name": ""}}]), "tools", "name"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(client, model, body, param,
                                                          words) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model, **body)
    assert error.value.body["param"] == param and words in error.value.body["message"]


def test_history_arguments_that_are_not_a_json_object_are_a_400(client, model) -> None:
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=5)
    assert "arguments must be a JSON object" in error.value.body["message"]
    after = chat(client, model, tools=TOOLS).choices[0]   # and the server keeps serving
    assert after.finish_reason == "tool_calls"


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=64, progress=False)
    yield eng
    eng.shutdown()


def in_process_chat(engine, config: ServerConfig):
    http = create_app(engine, config).test_client()
    return http.post("/v1/chat/completions", json={
        "model": "gpt-oss", "messages": QUESTION, "tools": TOOLS, "temperature": 0,
        "max_tokens": 60})


def test_the_servers_tool_call_parser_overrides_what_the_template_asks_for(engine) -> None:
    [choice] = in_process_chat(engine, ServerConfig(tool_call_parser="hermes")).json["choices"]
    assert choice["message"]["content"] == ARGUMENTS   # hermes looks for <tool_call>
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"


def test_harmony_calls_without_the_harmony_reasoning_format_are_a_400(engine) -> None:
    resp = in_process_chat(engine, ServerConfig(reasoning_parser="qwen3"))
    assert resp.status_code == 400 and resp.json["error"]["param"] == "tools"
    assert "harmony reasoning format" in resp.json["error"]["message"]


def test_vllms_tool_flags_are_taken_as_vllm_spells_them() -> None:
    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice",
                                      "--tool-call-parser", "hermes"])
    assert args.tool_call_parser == "hermes"


def test_an_unknown_tool_call_parser_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known formats: hermes, llama3_json, openai, "
                                         "qwen3_coder"):
        ServerConfig(tool_call_parser="mistral")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "mistral"])


@pytest.mark.parametrize("stream", [False, True])
def test_with_parallel_tool_calls_false_a_choice_keeps_only_its_first_call(stream) -> None:
    calls = [ToolCall("get_weather", ARGUMENTS), ToolCall("now", "{}")]
    out = RequestOutput("r-0", token_ids=[1, 2], tool_calls=calls, finished=True,
                        finish_reason="stop")
    for parallel, names in ((True, ["get_weather", "now"]), (False, ["get_weather"])):
        req = ChatCompletionRequest.model_validate({
            "model": "m", "messages": QUESTION, "tools": TOOLS, "stream": stream,
            "parallel_tool_calls": parallel})
        gen = Generation(OneOutputEngine(out), Metrics(), lambda: False)
        gen.submit([[1]], SamplingParams(), 1, None)
        chat = _Chat(req, gen, None)
        if stream:
            sent = [call for chunk in chat.chunks()
                    for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
            assert [call["index"] for call in sent] == list(range(len(names)))
        else:
            sent = chat.response()["choices"][0]["message"]["tool_calls"]
        assert [call["function"]["name"] for call in sent] == names
