"""The table of reasoning formats: by name (the server's --reasoning-parser, spelled as
vLLM spells its parsers) and by what a chat template renders.

A model's format is decided by what its chat template renders, not by what its source
mentions: `detect_reasoning_format` renders a short conversation with the generation
prompt, thinking on and off, and asks each known format whether those prompts are its
own; a new format is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from engine.text.harmony import HARMONY
from engine.text.reasoning import ReasoningFormat
from engine.text.think_tags import THINK_TAGS

REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "qwen3": THINK_TAGS,
    "deepseek_r1": THINK_TAGS,
    "openai_gptoss": HARMONY,
}
# Asked in this order; the first that recognises a template's prompts wins.
_DETECTION_ORDER: tuple[ReasoningFormat, ...] = (THINK_TAGS, HARMONY)


Format = TypeVar("Format")


def format_by_name(formats: Mapping[str, Format], name: str, kind: str) -> Format:
    """The format of `formats` called `name`; ValueError naming the known ones otherwise."""
    try:
        return formats[name]
    except KeyError:
        known = ", ".join(sorted(formats))
        raise ValueError(f"unknown {kind} {name!r}; known formats: {known}") from None


def reasoning_format_by_name(name: str) -> ReasoningFormat:
    return format_by_name(REASONING_FORMATS, name, "reasoning format")


def detect_reasoning_format(render: Callable[[bool], str]) -> ReasoningFormat | None:
    """The format of the trace a chat template writes, from what it renders:
    `render(enable_thinking)` is its prompt for PROBE_MESSAGES with the generation prompt.
    None: no separable trace (separate_reasoning is a no-op, reasoning_effort is refused),
    also when the template refuses the probe (ValueError)."""
    try:
        thinking, no_thinking = render(True), render(False)
    except ValueError:
        return None
    return next((fmt for fmt in _DETECTION_ORDER if fmt.writes(thinking, no_thinking)), None)
