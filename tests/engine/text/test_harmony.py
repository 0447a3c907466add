"""The harmony splitter, effort levels and format detection, on a harmony tokenizer.

Expected splits are written by hand from the format (analysis bodies are reasoning,
every other channel's body is content, headers and markers vanish). Every output is fed
whole, one token at a time, and cut in two at every token boundary: the markers are
single tokens, so the cuts fall on both sides of every marker and inside headers.
"""

from __future__ import annotations

import pytest

from engine.text.harmony import (
    FORCED_FINAL,
    HARMONY_TOOL_CALLS,
    HarmonySplitter,
    harmony_effort,
    renders_harmony,
)
from engine.text.reasoning import parse_reasoning_effort, thinking_budget
from engine.text.tokenizer import Tokenizer
from engine.text.tool_calls import ToolCall

ANALYSIS = "<|channel|>analysis<|message|>"
FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"
CALL = ('<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather '
        '<|constrain|>json<|message|>{"location": "Paris"}<|call|>')
WEATHER = ToolCall("get_weather", '{"location": "Paris"}')

# (name, output text, expected reasoning, expected content); the prompt ends <|start|>assistant.
CASES = [
    ("analysis-then-final", f"{ANALYSIS}User asks 2+2.{FINAL}four<|return|>",
     "User asks 2+2.", "four"),
    ("cut-off-in-analysis", f"{ANALYSIS}Let me think", "Let me think", ""),
    ("cut-off-in-final-header", f"{ANALYSIS}think<|end|><|start|>assistant<|channel|>fin",
     "think", ""),
    ("cut-off-after-end", f"{ANALYSIS}think<|end|>", "think", ""),
    ("two-analysis-messages",
     f"{ANALYSIS}first<|end|><|start|>assistant{ANALYSIS}second{FINAL}answer<|return|>",
     "firstsecond", "answer"),
    ("final-only", "<|channel|>final<|message|>just the answer<|return|>", "", "just the answer"),
    ("multi-byte-characters", f"{ANALYSIS}café über{FINAL}über café<|return|>",
     "café über", "über café"),
    # Without tool calls asked for, a call's body is content like any other.
    ("tool-call-header", f"{ANALYSIS}call it{CALL}", "call it", '{"location": "Paris"}'),
    ("recipient-before-channel", f"{ANALYSIS}call<|end|><|start|>assistant to=functions.x"
     "<|channel|>commentary json<|message|>{}<|call|>", "call", "{}"),
    ("text-outside-messages", f"{ANALYSIS}think<|end|>stray", "think", "stray"),
    ("empty-analysis", f"{ANALYSIS}{FINAL}four<|return|>", "", "four"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_harmony_model_dir) -> Tokenizer:
    return Tokenizer(tiny_harmony_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": "What is two plus two?"}])


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _split(tokenizer, prompt_ids, pieces: list[list[int]], **kwargs) -> list[tuple[str, str]]:
    """Feed the pieces in turn; every (reasoning, content) released, finish() last."""
    splitter = HarmonySplitter(tokenizer, prompt_ids, **kwargs)
    return [splitter.feed(piece) for piece in pieces] + [splitter.finish()]


def _cuttings(ids: list[int]) -> list[list[list[int]]]:
    return ([[ids], [[token] for token in ids]]
            + [[ids[:cut], ids[cut:]] for cut in range(1, len(ids))])


@pytest.mark.parametrize("name, output, reasoning, content", CASES, ids=[c[0] for c in CASES])
def test_split_is_the_same_however_the_tokens_are_streamed(tokenizer, prompt_ids, name, output,
                                                          reasoning, content):
    ids = _ids(tokenizer, output)
    for pieces in _cuttings(ids):
        released = _split(tokenizer, prompt_ids, pieces)
        assert "".join(r for r, _ in released) == reasoning
        assert "".join(c for _, c in released) == content
        # Reasoning first: no reasoning is released after the first content.
        first_content = next((i for i, (_, c) in enumerate(released) if c), len(released))
        assert not any(r for r, _ in released[first_content + 1:])
        assert "\ufffd" not in "".join(r + c for r, c in released)


@pytest.mark.parametrize("name, output, reasoning, content", CASES, ids=[c[0] for c in CASES])
def test_inline_trace_is_readable_text_in_content(tokenizer, prompt_ids, name, output, reasoning,
                                                  content):
    want = "\n\n".join(part for part in (reasoning, content) if part)
    if name == "two-analysis-messages":
        want = "first\n\nsecond\n\nanswer"
    for pieces in _cuttings(_ids(tokenizer, output)):
        released = _split(tokenizer, prompt_ids, pieces, separate_reasoning=False)
        assert "".join(r for r, _ in released) == ""
        assert "".join(c for _, c in released) == want


def test_reasoning_tokens_count_the_analysis_bodies(tokenizer, prompt_ids):
    first, second = _ids(tokenizer, "User asks 2+2."), _ids(tokenizer, "Easy.")
    output = _ids(tokenizer, f"{ANALYSIS}User asks 2+2.<|end|><|start|>assistant{ANALYSIS}Easy."
                             f"{FINAL}four<|return|>")
    for separate in (True, False):
        splitter = HarmonySplitter(tokenizer, prompt_ids, separate_reasoning=separate)
        for token in output:
            splitter.feed([token])
        assert splitter.reasoning_tokens == len(first) + len(second)


def test_phases_follow_the_messages(tokenizer, prompt_ids):
    splitter = HarmonySplitter(tokenizer, prompt_ids)
    seen = []
    for token in _ids(tokenizer, f"{ANALYSIS}hm{FINAL}four"):
        splitter.feed([token])
        seen.append((splitter.in_reasoning, splitter.trace_open))
    header, body, final_header, answer = (len(_ids(tokenizer, text))
                                          for text in (ANALYSIS, "hm", FINAL, "four"))
    assert seen == ([(True, False)] * (header - 1)           # <|channel|>analysis
                    + [(True, True)] * (1 + body)           # <|message|>hm
                    + [(True, False)] * (final_header - 1)  # <|end|> ... final
                    + [(False, False)] * (1 + answer))      # <|message|>four


def test_prompt_history_does_not_decide_where_the_output_starts(tokenizer):
    history = tokenizer.encode_chat([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "thinking": "greet"},
        {"role": "user", "content": "What is two plus two?"}])
    splitter = HarmonySplitter(tokenizer, history)
    assert splitter.in_reasoning and not splitter.trace_open
    assert splitter.feed(_ids(tokenizer, f"{ANALYSIS}sum{FINAL}four")) == ("sum", "four")


def test_prompt_that_opens_the_final_channel_makes_the_output_content(tokenizer, prompt_ids):
    prompt = prompt_ids + _ids(tokenizer, "<|channel|>final<|message|>")
    splitter = HarmonySplitter(tokenizer, prompt)
    assert not splitter.in_reasoning
    assert splitter.feed(_ids(tokenizer, "four<|return|>")) == ("", "four")
    assert splitter.reasoning_tokens == 0


@pytest.mark.parametrize("effort, level", [
    ("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high"),
    (0.0, "low"), (0.01, "low"), (0.3, "low"), (0.4499, "low"), (0.45, "medium"),
    (0.6, "medium"), (0.7499, "medium"), (0.75, "high"), (0.9, "high"), (1.0, "high"),
])
def test_effort_maps_onto_gpt_oss_levels(effort, level):
    assert harmony_effort(parse_reasoning_effort(effort)) == level


def test_template_writes_the_level_and_is_detected_as_harmony(tokenizer):
    chat = [{"role": "user", "content": "Hi"}]
    for level in ("low", "medium", "high"):
        prompt = tokenizer.render_chat(chat, reasoning_effort=level)
        assert f"\nReasoning: {level}\n" in prompt
        assert renders_harmony(prompt)
    assert not renders_harmony(tokenizer.render_chat(chat, add_generation_prompt=False))
    assert not renders_harmony("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("effort, budget", [(0.3, 10), (0.6, 7), (0.01, 50)])
def test_budget_forces_the_final_channel_after_its_share_of_analysis_tokens(
        tokenizer, prompt_ids, effort, budget):
    """The thinking-budget rule of engine/text/pipeline.py (stop watching once the answer
    began; inside the trace, force the end once `reasoning_tokens` reaches the budget),
    run on the harmony splitter with a model that would think forever."""
    allowed = thinking_budget(effort, budget)
    forced_ids = _ids(tokenizer, FORCED_FINAL)
    thinking = _ids(tokenizer, " the")
    assert len(thinking) == 1
    splitter = HarmonySplitter(tokenizer, prompt_ids)
    model = iter(_ids(tokenizer, ANALYSIS) + thinking * 100)
    reasoning = ""
    while splitter.in_reasoning and not (splitter.trace_open
                                         and splitter.reasoning_tokens >= allowed):
        reasoning += splitter.feed([next(model)])[0]
    r, content = splitter.feed(forced_ids + _ids(tokenizer, "four<|return|>"))
    assert splitter.reasoning_tokens == allowed
    assert (reasoning + r, content) == (" the" * allowed, "four")


def test_a_body_cut_inside_a_character_ends_as_decode_ends_it(tokenizer, prompt_ids):
    """The model may end a message halfway through a UTF-8 character: the bytes it wrote
    stay in that message (as U+FFFD, as tokenizer.decode gives them), not in the next."""
    body = _ids(tokenizer, "café")[:-1]                       # "caf" and é's first byte
    assert tokenizer.decode(body).endswith("\ufffd")
    output = _ids(tokenizer, ANALYSIS) + body + _ids(tokenizer, f"{FINAL}four<|return|>")
    for pieces in _cuttings(output):
        released = _split(tokenizer, prompt_ids, pieces)
        assert "".join(r for r, _ in released) == tokenizer.decode(body)
        assert "".join(c for _, c in released) == "four"


# (name, output, expected reasoning, content, calls) with tool calls asked for.
CALL_CASES = [
    ("a-call-after-analysis", f"{ANALYSIS}call it{CALL}", "call it", "", [WEATHER]),
    ("recipient-before-channel", f"{ANALYSIS}call<|end|><|start|>assistant to=functions.x"
     "<|channel|>commentary json<|message|>{}<|call|>", "call", "", [ToolCall("x", "{}")]),
    ("a-preamble-then-a-call", f"{ANALYSIS}hm<|end|><|start|>assistant<|channel|>commentary"
     f"<|message|>Checking.{CALL}", "hm", "Checking.", [WEATHER]),
    ("two-calls", f"{ANALYSIS}both{CALL}<|start|>assistant<|channel|>commentary to=functions.x"
     "<|message|>{ }<|call|>", "both", "", [WEATHER, ToolCall("x", "{}")]),
    ("arguments-that-are-not-json", f"{ANALYSIS}hm<|end|><|start|>assistant<|channel|>"
     "commentary to=functions.x<|message|>Paris<|call|>", "hm", "", [ToolCall("x", "Paris")]),
    ("a-call-cut-off", f"{ANALYSIS}hm<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.x<|message|>{"location', "hm", '{"location', []),
    ("an-answer-and-no-call", f"{ANALYSIS}sum{FINAL}four<|return|>", "sum", "four", []),
]


def _split_with_calls(tokenizer, prompt_ids, pieces: list[list[int]]):
    """The pipeline's order: the splitter, then the tool-call parser on its content."""
    splitter = HarmonySplitter(tokenizer, prompt_ids)
    parser = HARMONY_TOOL_CALLS.parser([], splitter)
    reasoning, content, calls = "", "", []
    for released in [splitter.feed(piece) for piece in pieces] + [splitter.finish()]:
        text, completed = parser.feed(released[1])
        reasoning, content, calls = reasoning + released[0], content + text, calls + completed
    text, completed = parser.finish()
    return reasoning, content + text, calls + completed


@pytest.mark.parametrize("name, output, reasoning, content, calls", CALL_CASES,
                         ids=[c[0] for c in CALL_CASES])
def test_messages_to_functions_are_tool_calls_however_the_tokens_are_streamed(
        tokenizer, prompt_ids, name, output, reasoning, content, calls):
    for pieces in _cuttings(_ids(tokenizer, output)):
        assert _split_with_calls(tokenizer, prompt_ids, pieces) == (reasoning, content, calls)


def test_a_call_is_completed_by_the_token_that_ends_its_message(tokenizer, prompt_ids):
    splitter = HarmonySplitter(tokenizer, prompt_ids)
    parser = HARMONY_TOOL_CALLS.parser([], splitter)
    *body, end = _ids(tokenizer, f"{ANALYSIS}call it{CALL}")
    for token in body:
        assert parser.feed(splitter.feed([token])[1]) == ("", [])
    assert parser.feed(splitter.feed([end])[1]) == ("", [WEATHER])


def test_harmony_tool_calls_need_the_harmony_splitter():
    with pytest.raises(ValueError, match="harmony reasoning format"):
        HARMONY_TOOL_CALLS.parser([], None)
