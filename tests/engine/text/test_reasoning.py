"""The reasoning splitter, format detection, reasoning_effort and thinking budgets.

Expected splits are written by hand from the rule the module documents (the Qwen3
template's own split: trace between the markers with its newlines stripped, answer after
the end marker with its leading newlines stripped; cut off inside the trace -> all
reasoning; no trace -> text untouched). Every case is fed whole, character by
character, split in two at every point, and in random pieces.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import jinja2.sandbox
import pytest

from engine.text.harmony import HARMONY
from engine.text.reasoning import (
    PROBE_MESSAGES,
    REASONING_EFFORTS,
    parse_reasoning_effort,
    thinking_budget,
)
from engine.text.reasoning_formats import detect_reasoning_format, reasoning_format_by_name
from engine.text.think_tags import THINK_TAGS, ReasoningSplitter, split_reasoning
from engine.text.tokenizer import Tokenizer
from tests.engine.text.test_tokenizer import QWEN3_STYLE_TEMPLATE
from tests.tiny_models import save_tiny_tokenizer

DEMO_TEMPLATE = Path(__file__).resolve().parents[3] / "scripts" / "demo_chat_template.jinja"

OPEN = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>\n"
CLOSED = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
# Earlier turns' markers must not decide anything: only the prompt's end does.
HISTORY = ("<|im_start|>assistant\n<think>\nold\n</think>\n\nold answer<|im_end|>\n"
           "<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n")

# (name, prompt, output, expected reasoning, expected content)
CASES = [
    ("open_then_answer", OPEN, "I add 7 and 5.\n</think>\n\n7 + 5 = 12.",
     "I add 7 and 5.", "7 + 5 = 12."),
    ("open_cut_off", OPEN, "Let me think\n\n", "Let me think", ""),
    ("open_cut_off_inside_end_marker", OPEN, "Let me\n</thi", "Let me\n</thi", ""),
    ("open_empty_trace", OPEN, "</think>\n\nAnswer.", "", "Answer."),
    ("open_newline_conventions", OPEN, "\n\nabc\n\ndef\n\n</think>\n\n\nAns\n",
     "abc\n\ndef", "Ans\n"),
    ("open_only_newlines_stripped", OPEN, " abc \n</think> \nAns", " abc ", " \nAns"),
    ("open_lookalike_markers", OPEN, "a </thinking> < /think> <thin b\n</think>\nc",
     "a </thinking> < /think> <thin b", "c"),
    ("open_overlapping_marker_start", OPEN, "x <</</think>y", "x <</", "y"),
    ("open_end_marker_again_in_answer", OPEN, "r</think>a</think>b", "r", "a</think>b"),
    ("open_forced_end", OPEN, "partial thought" + THINK_TAGS.forced_end + "Ans",
     "partial thought", "Ans"),
    ("open_unicode", OPEN, "x \u2192 y \U0001F642</think>\U0001F642", "x \u2192 y \U0001F642",
     "\U0001F642"),
    ("closed_all_content", CLOSED, "12. <think>x</think>", "", "12. <think>x</think>"),
    ("closed_leading_newlines", CLOSED, "\n\nHello", "", "Hello"),
    ("plain_opens_trace", PLAIN, "<think>\nabc\n</think>\n\nAns", "abc", "Ans"),
    ("plain_whitespace_before_start", PLAIN, "\n \n<think>abc</think>Ans", "abc", "Ans"),
    ("plain_text_before_start_is_no_trace", PLAIN, "Sure. <think>abc</think>", "",
     "Sure. <think>abc</think>"),
    ("plain_no_trace_untouched", PLAIN, "\nHello there\n", "", "\nHello there\n"),
    ("plain_cut_off_inside_start_marker", PLAIN, "<thi", "", "<thi"),
    ("plain_only_whitespace", PLAIN, "  \n", "", "  \n"),
    ("plain_cut_off_inside_trace", PLAIN, "<think>\nabc", "abc", ""),
    ("history_markers_ignored", HISTORY, "<think>new</think>ans", "new", "ans"),
    ("history_no_trace", HISTORY, "ans</think>", "", "ans</think>"),
    ("empty_output_open", OPEN, "", "", ""),
]
CASE_IDS = [case[0] for case in CASES]


def _chunkings(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    for seed in range(20):
        rng = random.Random(seed)
        pieces, at = [], 0
        while at < len(text):
            step = rng.randint(1, 6)
            pieces.append(text[at:at + step])
            at += step
        yield pieces


def _stream(prompt: str, pieces: list[str]) -> list[tuple[str, str]]:
    splitter = ReasoningSplitter(THINK_TAGS, prompt)
    return [splitter.feed(piece) for piece in pieces] + [splitter.finish()]


@pytest.mark.parametrize("name,prompt,output,reasoning,content", CASES, ids=CASE_IDS)
def test_split_of_whole_output_matches_hand_written(name, prompt, output, reasoning, content):
    assert split_reasoning(THINK_TAGS, output, prompt) == (reasoning, content)


@pytest.mark.parametrize("name,prompt,output,reasoning,content", CASES, ids=CASE_IDS)
def test_streamed_pieces_join_to_the_same_split(name, prompt, output, reasoning, content):
    for pieces in _chunkings(output):
        deltas = _stream(prompt, pieces)
        assert "".join(r for r, _ in deltas) == reasoning, pieces
        assert "".join(c for _, c in deltas) == content, pieces


@pytest.mark.parametrize("name,prompt,output,reasoning,content", CASES, ids=CASE_IDS)
def test_no_reasoning_is_released_after_content_started(name, prompt, output, reasoning,
                                                        content):
    for pieces in _chunkings(output):
        content_started = False
        for r, c in _stream(prompt, pieces):
            assert not (content_started and r), pieces
            content_started = content_started or bool(c)


def test_text_that_cannot_be_a_marker_is_released_at_once():
    splitter = ReasoningSplitter(THINK_TAGS, OPEN)
    assert splitter.feed("abc<") == ("abc", "")
    assert splitter.feed("b") == ("<b", "")
    assert splitter.feed("\n") == ("", "")           # may be dropped before </think>
    assert splitter.feed("\n") == ("", "")
    assert splitter.feed("d") == ("\n\nd", "")
    assert splitter.feed("</th") == ("", "")
    assert splitter.feed("ink>\n") == ("", "")       # the answer's leading newlines go
    assert splitter.feed("\nA") == ("", "A")
    assert splitter.feed("<") == ("", "<")           # the answer holds nothing back
    assert splitter.finish() == ("", "")


def test_undecided_start_is_held_then_released_as_content():
    splitter = ReasoningSplitter(THINK_TAGS, PLAIN)
    assert splitter.feed(" <th") == ("", "")
    assert splitter.in_reasoning
    assert splitter.feed("e") == ("", " <the")
    assert not splitter.in_reasoning


def test_start_marker_opens_trace_as_soon_as_complete():
    splitter = ReasoningSplitter(THINK_TAGS, PLAIN)
    assert splitter.feed("<think>") == ("", "")
    assert splitter.feed("\nx") == ("x", "")
    assert splitter.in_reasoning
    assert splitter.feed("</think>") == ("", "")
    assert not splitter.in_reasoning


def test_reasoning_tokens_count_through_the_end_marker():
    tokens = ["<", "think", ">", "\n", "Add", ".", "\n", "</", "think", ">", "\n\n", "12"]
    splitter = ReasoningSplitter(THINK_TAGS, PLAIN)
    for token in tokens:
        splitter.feed(token, num_tokens=1)
    splitter.finish()
    assert splitter.reasoning_tokens == tokens.index(">", 7) + 1


def test_reasoning_tokens_zero_without_trace():
    splitter = ReasoningSplitter(THINK_TAGS, PLAIN)
    for token in [" ", "<", "b", ">", "hi"]:
        splitter.feed(token, num_tokens=1)
    splitter.finish()
    assert splitter.reasoning_tokens == 0


def test_reasoning_tokens_count_all_of_a_cut_off_trace():
    splitter = ReasoningSplitter(THINK_TAGS, OPEN)
    for token in ["Let", " me", " see", "\n"]:
        splitter.feed(token, num_tokens=1)
    splitter.finish()
    assert splitter.reasoning_tokens == 4


def _render_demo(enable_thinking: bool | None) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return env.from_string(DEMO_TEMPLATE.read_text()).render(
        messages=[{"role": "user", "content": "What is 7 + 5?"}],
        add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("enable_thinking,expected", [
    (None, ("I add.", "12")), (True, ("I add.", "12")), (False, ("", "I add.</think>12"))])
def test_demo_template_prompt_decides_whether_thinking_is_open(enable_thinking, expected):
    prompt = _render_demo(enable_thinking)
    assert split_reasoning(THINK_TAGS, "I add.</think>12", prompt) == expected


@pytest.mark.parametrize("enable_thinking,opens", [(None, True), (True, True), (False, False)])
def test_a_prompt_opens_the_trace_only_when_the_template_left_it_open(enable_thinking, opens):
    assert THINK_TAGS.opens_trace(_render_demo(enable_thinking)) is opens
    assert not THINK_TAGS.opens_trace(HISTORY)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A tokenizer without a chat template of its own."""
    path = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(path)
    return Tokenizer(path)


def renders(tokenizer: Tokenizer, template: str | None):
    """`render(enable_thinking)` for detect_reasoning_format, as the server makes it."""
    return lambda enable_thinking: tokenizer.render_chat(
        list(PROBE_MESSAGES), chat_template=template or None, enable_thinking=enable_thinking)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + "
          "'<|im_end|>\\n' }}{% endfor %}")
# DeepSeek-R1-style: the generation prompt opens a trace, and nothing in the template
# ever closes one (nor looks at enable_thinking).
R1_STYLE_TEMPLATE = (CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n"
                     "<think>\\n' }}{% endif %}")


@pytest.mark.parametrize("template", [DEMO_TEMPLATE.read_text(), R1_STYLE_TEMPLATE,
                                      QWEN3_STYLE_TEMPLATE], ids=["demo", "r1", "qwen3"])
def test_templates_that_open_or_close_a_trace_in_the_prompt_are_think_tags(tokenizer,
                                                                           template):
    # demo, R1: the prompt ends inside an open trace; Qwen3: thinking off writes an empty one.
    assert detect_reasoning_format(renders(tokenizer, template)) == THINK_TAGS


@pytest.mark.parametrize("template", [
    None, "", CHATML,
    "{{ '<think>' }} but never closed",
    # Both markers in the source, neither in a prompt: it only strips old traces.
    "{% for m in messages %}{{ m.content.split('</think>')[-1].replace('<think>', '') }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # A system prompt that talks about the markers, then a plain generation prompt.
    "Think inside <think></think> first.\n" + CHATML + "<|im_start|>assistant\n",
    # A closed trace that is not empty is history, not the template's switch.
    CHATML + "<think>old</think>",
])
def test_templates_whose_prompts_hold_no_trace_of_their_own_have_no_format(tokenizer,
                                                                            template):
    assert detect_reasoning_format(renders(tokenizer, template)) is None


def test_a_template_that_refuses_the_probe_has_no_format(tokenizer):
    refuses = "{{ raise_exception('needs a system message') }}" + R1_STYLE_TEMPLATE
    assert detect_reasoning_format(renders(tokenizer, refuses)) is None


def test_formats_by_name():
    assert reasoning_format_by_name("qwen3") == THINK_TAGS
    assert reasoning_format_by_name("deepseek_r1") == THINK_TAGS
    assert reasoning_format_by_name("openai_gptoss") is HARMONY
    with pytest.raises(ValueError, match="deepseek_r1, openai_gptoss, qwen3"):
        reasoning_format_by_name("qwen")


def test_forced_end_closes_the_way_the_template_does():
    # What enable_thinking=false writes after <think>: the marker with its newlines.
    assert _render_demo(False).endswith("<think>\n" + THINK_TAGS.forced_end)


@pytest.mark.parametrize("value,expected", [
    ("minimal", 0.01), ("low", 0.3), ("medium", 0.6), ("high", 0.9),
    (0, 0.0), (1, 1.0), (0.0, 0.0), (0.25, 0.25), (1.0, 1.0)])
def test_reasoning_effort_values(value, expected):
    assert parse_reasoning_effort(value) == expected


@pytest.mark.parametrize("value", [
    "max", "High", "", "0.5", 1.5, -0.1, float("nan"), float("inf"), True, None, [0.5]])
def test_bad_reasoning_effort_names_the_allowed_values(value):
    with pytest.raises(ValueError) as info:
        parse_reasoning_effort(value)
    for name in REASONING_EFFORTS:
        assert repr(name) in str(info.value)
    assert "[0.0, 1.0]" in str(info.value)


@pytest.mark.parametrize("effort,budget,expected", [
    (0.3, 10, 3), (0.6, 10, 6), (0.9, 10, 9), (0.01, 100, 1), (0.01, 1, 1), (0.01, 1000, 10),
    (0.0, 500, 0), (1.0, 37, 37), (0.5, 3, 2), (0.9, 0, 0)])
def test_thinking_budget_is_the_ceiling_of_the_decimal_product(effort, budget, expected):
    assert thinking_budget(effort, budget) == expected


def test_thinking_budget_is_monotonic_in_effort_and_budget():
    efforts = sorted({i / 1000 for i in range(1001)} | set(REASONING_EFFORTS.values())
                     | {math.nextafter(0.3, 1.0), math.nextafter(0.9, 0.0)})
    table = [[thinking_budget(e, b) for b in range(0, 300)] for e in efforts]
    for row, next_row in zip(table, table[1:]):
        assert all(a <= b for a, b in zip(row, next_row))
    for row in table:
        assert all(a <= b for a, b in zip(row, row[1:]))
        assert all(0 <= n <= b for b, n in enumerate(row))


@pytest.mark.parametrize("effort,budget", [(1.5, 10), (-0.1, 10), (0.5, -1), (0.5, 2.0)])
def test_thinking_budget_rejects_out_of_range(effort, budget):
    with pytest.raises(ValueError):
        thinking_budget(effort, budget)
