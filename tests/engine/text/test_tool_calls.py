"""Tool calls taken out of an answer: the text formats (hermes, qwen3_coder, llama3_json),
which format a template asks for, and the text pipeline's calls.

Expected calls are written by hand from the formats, or are what a template (written out
here after Qwen3's, Qwen3.5's and Llama 3.1's hub templates) renders for a call in the
history: the parser must read back the call the template wrote. Every output is fed whole, a
character at a time, and cut in two at every character, which cuts every tag.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling_params import SamplingParams
from engine.text.json_tool_calls import LLAMA3_JSON
from engine.text.pipeline import ReasoningOptions, TextPipeline, ToolCallOptions
from engine.text.reasoning import PROBE_MESSAGES
from engine.text.tagged_tool_calls import HERMES, QWEN3_CODER
from engine.text.think_tags import THINK_TAGS
from engine.text.tokenizer import Tokenizer
from engine.text.tool_call_formats import (
    TOOL_CALL_FORMATS,
    detect_tool_call_format,
    tool_call_format_by_name,
)
from engine.text.tool_calls import PROBE_TOOLS, ToolCall
from tests.engine.text.test_tokenizer import QWEN3_STYLE_TEMPLATE

# Qwen3.5's (Qwen3-Coder's) tool instructions and call history, abridged.
QWEN3_CODER_STYLE_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n# Tools\\n\\n' }}
    {{- 'You have access to the following functions:\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n<function>\\n<name>' + tool.function.name + '</name>\\n</function>' }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nIf you choose to call a function ONLY reply in the following format:' }}
    {{- '\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>' }}
    {{- '\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}
    {%- for tool_call in message.tool_calls or [] %}
        {%- set call = tool_call.function %}
        {{- '\\n<tool_call>\\n<function=' + call.name + '>\\n' }}
        {%- for name, value in call.arguments | items %}
            {{- '<parameter=' + name + '>\\n' }}
            {%- if value is mapping or (value is sequence and value is not string) %}
                {{- value | tojson }}
            {%- else %}
                {{- value | string }}
            {%- endif %}
            {{- '\\n</parameter>\\n' }}
        {%- endfor %}
        {{- '</function>\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# Llama 3.1's tool instructions (in the first user message) and call history, abridged.
LLAMA3_STYLE_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
    {%- if tools and loop.first %}
        {{- 'Given the following functions, please respond with a JSON for a function call ' }}
        {{- 'with its proper arguments that best answers the given prompt.\\n\\n' }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of ' }}
        {{- 'argument name and its value}. Do not use variables.\\n\\n' }}
        {%- for tool in tools %}{{- tool | tojson }}{{- '\\n\\n' }}{%- endfor %}
    {%- endif %}
    {%- if message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
    {%- else %}
        {{- message.content }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")

WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "units": {"type": "object"}, "hourly": {"type": "boolean"}}}}}]
WEATHER = ToolCall("get_weather", '{"city": "Paris"}')
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def call_of(name: str, arguments: dict) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


# (name, format, output, expected content, expected calls)
CASES = [
    ("hermes-content-then-a-call", HERMES, f"Let me check.\n{HERMES_CALL}", "Let me check.\n",
     [WEATHER]),
    ("hermes-two-calls", HERMES,
     f'{HERMES_CALL}\n<tool_call>\n{{"name": "f", "arguments": {{}}}}\n</tool_call>\n', "",
     [WEATHER, ToolCall("f", "{}")]),
    ("hermes-text-after-a-call", HERMES, f"{HERMES_CALL}\n\nDone.", "Done.", [WEATHER]),
    ("hermes-unicode-arguments", HERMES,
     '<tool_call>{"name": "f", "arguments": {"city": "Zürich"}}</tool_call>', "",
     [ToolCall("f", '{"city": "Zürich"}')]),
    ("hermes-invalid-json-is-content", HERMES, '<tool_call>\n{"name": f}\n</tool_call>\n ok',
     '<tool_call>\n{"name": f}\n</tool_call>\n ok', []),
    ("hermes-arguments-not-an-object-is-content", HERMES,
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("hermes-call-cut-off-is-content", HERMES, '<tool_call>\n{"name": "get_wea',
     '<tool_call>\n{"name": "get_wea', []),
    ("hermes-half-a-tag-at-the-end-is-content", HERMES, "see <tool_ca", "see <tool_ca", []),
    ("hermes-a-lookalike-tag-is-content", HERMES, "a <tool> and <tool_call", "a <tool> and "
     "<tool_call", []),
    ("hermes-no-call", HERMES, "Paris is sunny.", "Paris is sunny.", []),
    ("qwen3-coder-typed-parameters", QWEN3_CODER,
     "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n"
     '<parameter=days>\n3\n</parameter>\n<parameter=units>\n{"t": "C"}\n</parameter>\n'
     "<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>", "Checking.\n",
     [call_of("get_weather", {"city": "New\nYork", "days": 3, "units": {"t": "C"},
                              "hourly": True})]),
    ("qwen3-coder-unknown-parameters-and-bad-numbers-stay-text", QWEN3_CODER,
     "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
     "<parameter=zoom>\n5\n</parameter>\n</function>\n</tool_call>", "",
     [call_of("get_weather", {"days": "three", "zoom": "5"})]),
    ("qwen3-coder-a-call-without-function-is-content", QWEN3_CODER,
     "<tool_call>\nget_weather\n</tool_call>", "<tool_call>\nget_weather\n</tool_call>", []),
    ("llama3-a-call", LLAMA3_JSON, ' {"name": "get_weather", "parameters": {"city": "Paris"}}',
     "", [WEATHER]),
    ("llama3-two-calls", LLAMA3_JSON,
     '{"name": "get_weather", "arguments": {"city": "Paris"}}; {"name": "f", "parameters": {}}',
     "", [WEATHER, ToolCall("f", "{}")]),
    ("llama3-a-semicolon-inside-a-string", LLAMA3_JSON,
     '{"name": "f", "parameters": {"q": "a; b"}}', "", [ToolCall("f", '{"q": "a; b"}')]),
    ("llama3-json-that-is-no-call-is-content", LLAMA3_JSON, '{"answer": 4}', '{"answer": 4}',
     []),
    ("llama3-a-call-and-text-is-content", LLAMA3_JSON, '{"name": "f", "parameters": {}} ok',
     '{"name": "f", "parameters": {}} ok', []),
    ("llama3-a-call-cut-off-is-content", LLAMA3_JSON, '{"name": "f", "para',
     '{"name": "f", "para', []),
    ("llama3-text-is-content", LLAMA3_JSON, "Sunny, {mostly}.", "Sunny, {mostly}.", []),
    ("llama3-a-call-after-its-tag-kept-as-text", LLAMA3_JSON,
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ("llama3-the-tag-alone-is-content", LLAMA3_JSON, "<|python_tag|>", "<|python_tag|>", []),
]


def _cuttings(text: str) -> list[list[str]]:
    return [[text], list(text)] + [[text[:cut], text[cut:]] for cut in range(1, len(text))]


def parse(fmt, pieces: list[str], tools=WEATHER_TOOLS) -> tuple[str, list[ToolCall]]:
    parser = fmt.parser(tools, None)
    content, calls = "", []
    for piece in pieces:
        text, completed = parser.feed(piece)
        content, calls = content + text, calls + completed
    text, completed = parser.finish()
    return content + text, calls + completed


@pytest.mark.parametrize("name, fmt, output, content, calls", CASES, ids=[c[0] for c in CASES])
def test_calls_and_content_are_the_same_however_the_answer_is_streamed(name, fmt, output,
                                                                      content, calls):
    for pieces in _cuttings(output):
        assert parse(fmt, pieces) == (content, calls)


# Pieces of answers, markup and its near misses, that random answers are made of.
FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool", "_call>", "</tool", "\n", " ", "a", "{",
             "}", ";", '{"name": "f", "arguments": {"x": 1}}', '{"name": "g", "parameters": {}}',
             "<function=f>", "<parameter=x>", "3", "</parameter>", "</function>", "é",
             "<|python_tag|>"]


# Whole calls in each format, so that random answers hold well-formed ones too.
CALLS = [HERMES_CALL, '{"name": "get_weather", "parameters": {"city": "Paris"}}',
         "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n"
         "</function>\n</tool_call>"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([HERMES, QWEN3_CODER, LLAMA3_JSON]),
       st.lists(st.sampled_from(FRAGMENTS + CALLS * 3), max_size=8),
       st.lists(st.integers(0, 300), max_size=8))
def test_any_answer_parses_the_same_however_it_is_cut(fmt, fragments, cuts):
    answer = "".join(fragments)
    points = sorted({min(cut, len(answer)) for cut in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)])]
    assert parse(fmt, pieces) == parse(fmt, [answer])


def test_a_llama3_answer_that_does_not_open_with_a_brace_streams_as_content():
    parser = LLAMA3_JSON.parser([], None)
    assert parser.feed("  ") == ("", [])          # undecided: leading space
    assert parser.feed("Sun") == ("  Sun", [])
    assert parser.feed("ny {") == ("ny {", [])


def test_a_call_is_released_the_moment_its_closing_tag_completes():
    parser = HERMES.parser([], None)
    *body, last = HERMES_CALL
    assert all(parser.feed(char) == ("", []) for char in body)
    assert parser.feed(last) == ("", [WEATHER])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs) -> Tokenizer:
    return Tokenizer(tiny_model_dirs["qwen3-qk-norm-tied"])


ARGUMENTS = {"city": "São Paulo", "days": 3, "units": {"temp": "C", "wind": ["kmh"]}}


WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
NOW_CALL = {"type": "function", "function": {"name": "now", "arguments": {}}}


def assistant_turn(tokenizer, template: str, calls: list[dict], content: str | None,
                   opens: str, closes: str) -> str:
    """What `template` writes for an assistant turn with `calls`, between its markers."""
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": content, "tool_calls": calls},
            {"role": "user", "content": "Thanks."}]
    prompt = tokenizer.render_chat(chat, chat_template=template, tools=WEATHER_TOOLS,
                                   add_generation_prompt=False)
    return prompt.split(opens)[1].split(closes)[0]


@pytest.mark.parametrize("template, fmt", [(QWEN3_STYLE_TEMPLATE, HERMES),
                                           (QWEN3_CODER_STYLE_TEMPLATE, QWEN3_CODER)])
def test_the_parser_reads_back_the_calls_its_template_writes(tokenizer, template, fmt):
    turn = assistant_turn(tokenizer, template, [WEATHER_CALL, NOW_CALL], "Let me look.",
                          "<|im_start|>assistant\n", "<|im_end|>")
    assert parse(fmt, [turn]) == ("Let me look.\n", [call_of("get_weather", ARGUMENTS),
                                                     ToolCall("now", "{}")])


def test_the_llama3_parser_reads_back_the_call_its_template_writes(tokenizer):
    turn = assistant_turn(tokenizer, LLAMA3_STYLE_TEMPLATE, [WEATHER_CALL], None,
                          "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
    assert parse(LLAMA3_JSON, [turn]) == ("", [call_of("get_weather", ARGUMENTS)])


def test_the_format_is_the_one_the_template_asks_for(tokenizer, tiny_harmony_model_dir):
    def detect(tok: Tokenizer, template: str | None):
        return detect_tool_call_format(lambda: tok.render_chat(
            list(PROBE_MESSAGES), chat_template=template, tools=list(PROBE_TOOLS)))

    assert detect(tokenizer, QWEN3_STYLE_TEMPLATE) is HERMES
    assert detect(tokenizer, QWEN3_CODER_STYLE_TEMPLATE) is QWEN3_CODER
    assert detect(tokenizer, LLAMA3_STYLE_TEMPLATE) is LLAMA3_JSON
    assert detect(Tokenizer(tiny_harmony_model_dir), None) is TOOL_CALL_FORMATS["openai"]
    assert detect(tokenizer, PLAIN_TEMPLATE) is None
    assert detect(tokenizer, "{{ raise_exception('no tools here') }}") is None


def test_formats_are_named_as_vllm_names_its_parsers():
    assert set(TOOL_CALL_FORMATS) == {"hermes", "qwen3_coder", "llama3_json", "openai"}
    with pytest.raises(ValueError, match="known formats: hermes, llama3_json, openai, "
                                         "qwen3_coder"):
        tool_call_format_by_name("mistral")


def pipeline_run(tokenizer, output: str, **options) -> tuple[str, str, list[ToolCall]]:
    """Feed `output`'s tokens one at a time; the last ends the sequence by length."""
    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    pipeline = TextPipeline(tokenizer, prompt, SamplingParams(max_tokens=500), **options)
    ids = tokenizer.encode(output, add_special_tokens=False)
    deltas = [pipeline.feed(t, "length" if i == len(ids) - 1 else None)
              for i, t in enumerate(ids)]
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas),
            [call for d in deltas for call in d.tool_calls])


def test_the_pipeline_takes_calls_out_of_the_answer_not_out_of_the_trace(tokenizer):
    output = (f"<think>\nI could call {HERMES_CALL} here.\n</think>\n\n"
              f"Let me check.\n{HERMES_CALL}")
    reasoning = ReasoningOptions(THINK_TAGS)
    trace, answer, _ = pipeline_run(tokenizer, output, reasoning=reasoning)
    tools = ToolCallOptions(HERMES, WEATHER_TOOLS)
    assert pipeline_run(tokenizer, output, reasoning=reasoning, tool_calls=tools) == (
        trace, answer.removesuffix(HERMES_CALL), [WEATHER])
    assert HERMES_CALL in trace and answer.endswith(f"Let me check.\n{HERMES_CALL}")


def test_without_tool_call_options_the_calls_stay_in_the_content(tokenizer):
    assert pipeline_run(tokenizer, f"Sure.\n{HERMES_CALL}") == ("", f"Sure.\n{HERMES_CALL}", [])
