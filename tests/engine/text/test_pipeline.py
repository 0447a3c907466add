"""The per-request text pipeline: tokens in; text, stop strings, reasoning split and the
thinking budget out, whichever way the text falls across tokens."""

from __future__ import annotations

import pytest

from engine import ReasoningOptions, SamplingParams
from engine.text.pipeline import TextPipeline
from engine.text.think_tags import THINK_TAGS
from engine.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs) -> Tokenizer:
    return Tokenizer(tiny_model_dirs["llama-gqa-untied"])


def run(pipeline: TextPipeline, ids: list[int], last_ended_by: str | None = None):
    """Feed every token; (text, reasoning, content, stop string) joined over the deltas."""
    deltas = [pipeline.feed(t, last_ended_by if k == len(ids) - 1 else None)
              for k, t in enumerate(ids)]
    stop = next((d.stop_string for d in deltas if d.stop_string), None)
    return ("".join(d.text for d in deltas), "".join(d.reasoning for d in deltas),
            "".join(d.content for d in deltas), stop)


def test_a_stop_string_cuts_the_text_where_it_starts(tokenizer):
    ids = tokenizer.encode("the quick brown fox", add_special_tokens=False)
    pipeline = TextPipeline(tokenizer, [5], SamplingParams(stop=["brown"]))
    text, _, content, stop = run(pipeline, ids)
    assert (text, content, stop) == ("the quick ", "the quick ", "brown")


def test_stop_strings_count_only_from_min_tokens_on(tokenizer):
    ids = tokenizer.encode("the the the", add_special_tokens=False)
    pipeline = TextPipeline(tokenizer, [5], SamplingParams(stop=["the"], min_tokens=len(ids)))
    text, _, _, stop = run(pipeline, ids)
    assert text.startswith("the") and stop == "the"      # only the last one counts


def test_a_character_cut_off_by_the_length_limit_is_released_as_decode_gives_it(tokenizer):
    ids = tokenizer.encode("fox é", add_special_tokens=False)
    cut = ids[:-1]                                        # é is two byte-level tokens
    assert tokenizer.decode(cut).endswith("\ufffd")
    text, _, _, _ = run(TextPipeline(tokenizer, [5], SamplingParams()), cut, "length")
    assert text == tokenizer.decode(cut)


def reasoning_pipeline(tokenizer, prompt: str, **options) -> TextPipeline:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return TextPipeline(tokenizer, prompt_ids, SamplingParams(),
                        ReasoningOptions(THINK_TAGS, **options))


def test_reasoning_and_answer_are_split_however_the_markers_fall_across_tokens(tokenizer):
    output = tokenizer.encode("brown fox\n</think>\n\nthe dog", add_special_tokens=False)
    pipeline = reasoning_pipeline(tokenizer, "hello <think>")
    text, reasoning, content, _ = run(pipeline, output, "length")
    assert (reasoning, content) == ("brown fox", "the dog") and text == reasoning + content
    end = len(tokenizer.encode("brown fox\n</think>", add_special_tokens=False))
    assert pipeline.reasoning_tokens == end


def test_stop_strings_apply_to_the_answer_not_the_trace(tokenizer):
    output = tokenizer.encode("the fox</think>the fox jumps", add_special_tokens=False)
    prompt_ids = tokenizer.encode("hello <think>", add_special_tokens=False)
    pipeline = TextPipeline(tokenizer, prompt_ids, SamplingParams(stop=["fox"]),
                            ReasoningOptions(THINK_TAGS))
    _, reasoning, content, stop = run(pipeline, output)
    assert (reasoning, content, stop) == ("the fox", "the ", "fox")


def test_an_inline_trace_stays_in_the_content_and_is_still_counted(tokenizer):
    output = tokenizer.encode("brown fox</think>the dog", add_special_tokens=False)
    pipeline = reasoning_pipeline(tokenizer, "hello <think>", separate=False)
    _, reasoning, content, _ = run(pipeline, output, "length")
    assert (reasoning, content) == ("", "brown fox</think>the dog")
    assert pipeline.reasoning_tokens == len(tokenizer.encode("brown fox</think>",
                                                             add_special_tokens=False))


def test_a_spent_budget_asks_once_for_the_forced_end_marker(tokenizer):
    marker = tokenizer.encode(THINK_TAGS.forced_end, add_special_tokens=False)
    pipeline = reasoning_pipeline(tokenizer, "hello <think>", budget=2)
    assert pipeline.take_forced_ids() == []
    for token in tokenizer.encode("the quick", add_special_tokens=False)[:2]:
        pipeline.feed(token)
    assert pipeline.take_forced_ids() == marker
    assert pipeline.take_forced_ids() == []


def test_a_zero_budget_forces_the_marker_before_the_first_token(tokenizer):
    marker = tokenizer.encode(THINK_TAGS.forced_end, add_special_tokens=False)
    assert reasoning_pipeline(tokenizer, "hello <think>", budget=0).take_forced_ids() == marker


def test_no_budget_applies_when_the_prompt_leaves_no_trace_open(tokenizer):
    pipeline = reasoning_pipeline(tokenizer, "hello", budget=0)
    for token in tokenizer.encode("the quick", add_special_tokens=False):
        pipeline.feed(token)
        assert pipeline.take_forced_ids() == []
