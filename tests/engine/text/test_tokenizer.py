"""Chat-template rendering equals transformers' apply_chat_template, text and token ids,
for the default model's template and for a Qwen3-style template with thinking."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.text.tokenizer import Tokenizer

pytestmark = pytest.mark.model

# Qwen3's chat-template logic (thinking blocks, reasoning_content, tools, namespace,
# reversed loops, string methods), written out here: nothing is fetched from a hub.
QWEN3_STYLE_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou are provided with function signatures within <tools></tools>:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name " }}
    {{- "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

CHATS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "Answer in French."},
               {"role": "user", "content": "Bonjour 😀 — ça va?"}],
    "multi_turn": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Count to 3, 日本語で."}],
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <b>now</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def qwen_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tokenizer with <think> tokens and the Qwen3-style template saved in."""
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    hf.add_tokens(["<think>", "</think>"])
    hf.chat_template = QWEN3_STYLE_TEMPLATE
    out = tmp_path_factory.mktemp("qwen_style")
    hf.save_pretrained(out)
    return out


def oracle(model_dir: Path, messages: list[dict], **kwargs) -> tuple[str, list[int]]:
    hf = AutoTokenizer.from_pretrained(model_dir)
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return text, ids


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_template_matches_transformers_text_and_ids(
        tok, default_model_dir, chat, add_generation_prompt) -> None:
    text, ids = oracle(default_model_dir, chat, add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(chat, add_generation_prompt=add_generation_prompt) == text
    assert tok.encode_chat(chat, add_generation_prompt=add_generation_prompt) == ids


def test_chat_prompt_ids_carry_no_extra_bos(tok) -> None:
    ids = tok.encode_chat(CHATS["single"])
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(ids[0]) == 3   # system, user, assistant headers: no added BOS


def test_continue_final_message_matches_transformers(tok, default_model_dir) -> None:
    chat = CHATS["multi_turn"] + [{"role": "assistant", "content": "1, 2"}]
    text, ids = oracle(default_model_dir, chat, continue_final_message=True)
    got = tok.render_chat(chat, add_generation_prompt=False, continue_final_message=True)
    assert got == text and got.endswith("1, 2")
    assert tok.encode_chat(chat, add_generation_prompt=False, continue_final_message=True) == ids


def test_text_content_parts_render_as_the_joined_string(tok, default_model_dir) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Line one"},
                                          {"type": "text", "text": "Line two"}]}]
    text, _ = oracle(default_model_dir, [{"role": "user", "content": "Line one\nLine two"}],
                     add_generation_prompt=True)
    assert tok.render_chat(parts) == text


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}],
                         ids=["default", "thinking", "no_thinking"])
@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_qwen3_style_template_matches_transformers(qwen_dir, chat, kwargs) -> None:
    text, ids = oracle(qwen_dir, chat, add_generation_prompt=True, **kwargs)
    tok = Tokenizer(qwen_dir)
    assert tok.render_chat(chat, **kwargs) == text
    assert tok.encode_chat(chat, **kwargs) == ids
    assert text.endswith("<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)


def test_qwen3_style_reasoning_history_and_tools_match_transformers(qwen_dir) -> None:
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
             "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18°C, sunny"},
            {"role": "assistant", "content": "<think>\nIt is sunny.\n</think>\n\nSunny, 18°C.",
             "reasoning": None},
            {"role": "user", "content": "Thanks"}]
    text, ids = oracle(qwen_dir, chat, add_generation_prompt=True, tools=TOOLS)
    tok = Tokenizer(qwen_dir)
    assert tok.render_chat(chat, tools=TOOLS) == text
    assert tok.encode_chat(chat, tools=TOOLS) == ids
    assert "<b>now</b>" in text   # tojson does not HTML-escape


def test_chat_template_argument_overrides_the_models_template(tok, default_model_dir) -> None:
    text, ids = oracle(default_model_dir, CHATS["system"], add_generation_prompt=True,
                       chat_template=QWEN3_STYLE_TEMPLATE, enable_thinking=False)
    got = tok.render_chat(CHATS["system"], chat_template=QWEN3_STYLE_TEMPLATE,
                          enable_thinking=False)
    assert got == text and "<think>" in got


def test_template_globals_behave_as_in_transformers(tok, default_model_dir) -> None:
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}"
                "{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% endfor %}{{ ns.n }} {{ bos_token }} "
                "{{ dict(a=1) | tojson }} {{ strftime_now('%Y') | length }}")
    chat = CHATS["multi_turn"]
    text, _ = oracle(default_model_dir, chat, chat_template=template)
    assert tok.render_chat(chat, add_generation_prompt=False, chat_template=template) == text


def test_template_cannot_reach_python_internals(tok) -> None:
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template error"):
        tok.render_chat(CHATS["single"], chat_template=template)


def test_template_raise_exception_is_a_value_error_with_its_message(tok) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.render_chat(CHATS["single"], chat_template=template)


@pytest.mark.parametrize("template", [
    "{{ messages[0].content + 1 }}",                 # TypeError
    "{{ messages | length // 0 }}",                  # ZeroDivisionError
    "{% for m in range(10**9) %}{% endfor %}",       # the sandbox's OverflowError
], ids=["type", "zero_division", "range"])
def test_a_template_failing_on_its_data_is_a_value_error_naming_the_failure(tok,
                                                                            template) -> None:
    with pytest.raises(ValueError, match="chat template error: [A-Za-z]+Error"):
        tok.render_chat(CHATS["single"], chat_template=template)


def test_model_without_template_is_refused_clearly(default_model_dir, tmp_path) -> None:
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    hf.chat_template = None
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = Tokenizer(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat(CHATS["single"])


@pytest.mark.parametrize("messages, kwargs, match", [
    (CHATS["single"], {"continue_final_message": True}, "cannot both be true"),
    (CHATS["single"], {"messages": []}, "may not set messages"),
    (CHATS["single"], {"documents": []}, "may not set documents"),
    ([], {}, "must not be empty"),
    (["hi"], {}, "must be an object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
     "content parts"),
])
def test_bad_chat_input_is_a_value_error_naming_the_problem(tok, messages, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tok.render_chat(messages, **kwargs)


def test_encode_decode_round_trip_and_special_tokens(tok) -> None:
    text = "naïve café 你好 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end and im_end in tok.special_ids
    assert tok.decode(ids + [im_end]) == text
    assert tok.decode(ids + [im_end], skip_special_tokens=False) == text + "<|im_end|>"
    assert tok.vocab_size == len(tok.hf)
