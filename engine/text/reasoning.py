"""Reasoning traces in general: what a reasoning format is, and how much a request may think.

A reasoning model writes its chain of thought apart from the answer, each family in its
own format: `<think>...</think>` around the trace (Qwen3, DeepSeek-R1:
engine/text/think_tags.py), or harmony's channels (gpt-oss: engine/text/harmony.py).
A `ReasoningFormat` says how to recognise its own templates, where a prompt leaves the
trace open, how to split an output into reasoning and answer as it streams, and what
the engine forces when a thinking budget is spent. engine/text/reasoning_formats.py keeps
the table of formats, by name and by what a template renders.

`reasoning_effort` is a fraction of a reasoning budget (`thinking_budget`); formats that
take an effort natively (harmony) also hear it through their chat template.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.text.tokenizer import Tokenizer

# The conversation a chat template is rendered with to see which format it writes.
PROBE_MESSAGES: tuple[dict, ...] = ({"role": "user", "content": "Hi"},)


class TraceSplitter(Protocol):
    """Splits one completion, fed token by token as it is generated, into reasoning and
    content; joining what `feed_token` and `finish` return gives the same two texts
    however the output falls into tokens."""

    reasoning_tokens: int          # the trace's tokens so far

    @property
    def in_reasoning(self) -> bool:
        """True while the output is, or may still turn out to be, reasoning."""

    @property
    def trace_open(self) -> bool:
        """True inside a trace that has certainly opened: where a budget may end it."""

    def feed_token(self, token_id: int, text: str) -> tuple[str, str]:
        """The next output token and the text it completes -> (reasoning, content) released."""

    def finish(self) -> tuple[str, str]:
        """The output is complete (or cut off): release what is still held back."""


class ReasoningFormat(ABC):
    """One family's way of writing a reasoning trace."""

    name: str
    forced_end: str     # what the engine forces into the sequence when the budget is spent

    @abstractmethod
    def writes(self, thinking_prompt: str, no_thinking_prompt: str) -> bool:
        """Whether a template whose generation prompts for PROBE_MESSAGES, with
        `enable_thinking` on and off, are these writes this format."""

    @abstractmethod
    def opens_trace(self, prompt_end: str) -> bool:
        """Whether a prompt ending in `prompt_end` leaves the output to think first (a
        thinking budget then counts from its first token)."""

    @abstractmethod
    def splitter(self, tokenizer: Tokenizer, prompt_ids: list[int], prompt_end: str,
                 separate: bool) -> TraceSplitter:
        """A splitter for one output. With `separate=False` everything is content (the
        trace inline, as readable text) and the trace is still counted."""

    def template_kwargs(self, effort: float | None) -> dict:
        """What the chat template hears of a request's reasoning effort (nothing, unless
        the format takes it natively)."""
        return {}


# reasoning_effort names and the fraction of the reasoning budget each allows.
REASONING_EFFORTS: dict[str, float] = {"minimal": 0.01, "low": 0.3, "medium": 0.6, "high": 0.9}


def parse_reasoning_effort(value: object) -> float:
    """The effort a request's `reasoning_effort` asks for, as a fraction in [0, 1]."""
    if isinstance(value, str) and value in REASONING_EFFORTS:
        return REASONING_EFFORTS[value]
    # bool is an int subclass; NaN fails both comparisons.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    names = ", ".join(repr(name) for name in REASONING_EFFORTS)
    raise ValueError(f"reasoning_effort must be one of {names} or a number in [0.0, 1.0], "
                     f"got {value!r}")


def thinking_budget(effort: float, reasoning_budget: int) -> int:
    """How many tokens the trace may take: ceil(effort * reasoning_budget).

    The product is taken on the decimal the effort is written as ("0.3" is 3/10, not
    the binary float just below it), so 0.3 of 10 tokens is 3 and 0.9 of 10 is 9. It is
    monotonic in both arguments: more effort, or a larger budget, never allows fewer
    tokens (shortest decimal reprs keep the order of the floats they stand for).
    """
    if not 0.0 <= effort <= 1.0:
        raise ValueError(f"effort must be in [0.0, 1.0], got {effort!r}")
    if isinstance(reasoning_budget, bool) or not isinstance(reasoning_budget, int) \
            or reasoning_budget < 0:
        raise ValueError(f"reasoning_budget must be a non-negative integer, "
                         f"got {reasoning_budget!r}")
    return math.ceil(Decimal(repr(float(effort))) * reasoning_budget)
