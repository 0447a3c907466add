"""Reasoning traces: which format a chat template writes, splitting `<think>...</think>`
from the answer, and thinking budgets.

A model's format is decided by what its chat template renders, not by what its source
mentions: `detect_reasoning_format` renders a short conversation with the generation
prompt, thinking on and off, and asks each known format whether those prompts are its
own (a table, so that a new format is one more entry).

A reasoning model writes its chain of thought between two markers, then the answer.
`ReasoningSplitter` turns the model's text, fed piece by piece as it is generated, into
a reasoning delta and a content delta per piece, so that a stream can send the trace and
the answer to different fields as they arrive.

Where the trace starts is decided by the prompt's end, which the chat template wrote:
- it ends with the start marker (Qwen3 with thinking on, DeepSeek-R1): the output
  begins inside the trace;
- it ends with the end marker (Qwen3's `enable_thinking=false` writes an empty trace,
  `<think>\\n\\n</think>\\n\\n`): the output is all answer, markers are plain text;
- neither: the output opens a trace only if the start marker is the first thing it
  writes (after whitespace); any other first text means there is no trace.

Whitespace follows the Qwen3 template's own split of an assistant message (what it does
to a message in the history): the trace loses its leading and trailing newlines, the
answer its leading newlines. Output cut off before the end marker is all reasoning.
vLLM's and SGLang's parsers keep those newlines; we drop them so that `content` reads
as the answer and feeding the message back through the template gives the same text.

Text that may still turn out to be part of a marker, or newlines that would be dropped
if the end marker follows, are held back, and released as soon as that is decided.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class ReasoningFormat:
    """The markers of one family's reasoning trace."""

    start: str        # opens the trace, e.g. "<think>"
    end: str          # closes it, e.g. "</think>"
    forced_end: str   # what the engine forces into the sequence when the thinking budget
                      # is spent: the end marker written as the template itself closes a trace


THINK_TAGS = ReasoningFormat(start="<think>", end="</think>", forced_end="\n</think>\n\n")

# Formats by name, as a server option names them (vLLM's --reasoning-parser names).
REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "qwen3": THINK_TAGS,
    "deepseek_r1": THINK_TAGS,
}


def reasoning_format_by_name(name: str) -> ReasoningFormat:
    """The registered format called `name`; ValueError naming the known ones otherwise."""
    try:
        return REASONING_FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(REASONING_FORMATS))
        raise ValueError(f"unknown reasoning format {name!r}; known formats: {known}") from None


# The conversation a chat template is rendered with to see which format it writes.
PROBE_MESSAGES: tuple[dict, ...] = ({"role": "user", "content": "Hi"},)


def detect_reasoning_format(render: Callable[[bool], str]) -> ReasoningFormat | None:
    """The format of the trace a chat template writes, from what it renders:
    `render(enable_thinking)` is its prompt for PROBE_MESSAGES with the generation prompt.
    None: no separable trace (separate_reasoning is a no-op, reasoning_effort is refused),
    also when the template refuses the probe (ValueError)."""
    try:
        thinking, no_thinking = render(True), render(False)
    except ValueError:
        return None
    return next((fmt for writes, fmt in _DETECTION if writes(thinking, no_thinking)), None)


def prompt_opens_trace(fmt: ReasoningFormat, prompt_text: str) -> bool:
    """True when the prompt ends inside a trace that the template opened: the output
    starts as reasoning, and a thinking budget counts from its first token."""
    return prompt_text.rstrip().endswith(fmt.start)


def _writes_think_tags(thinking: str, no_thinking: str) -> bool:
    """The prompt ends inside an open `<think>` (DeepSeek-R1-style templates, which never
    close it themselves, and the demo's), or with thinking off after an empty closed
    trace (Qwen3, whose prompt with thinking on leaves the opening to the model)."""
    closed = no_thinking.rstrip()
    return prompt_opens_trace(THINK_TAGS, thinking) or (
        closed.endswith(THINK_TAGS.end)
        and closed.removesuffix(THINK_TAGS.end).rstrip().endswith(THINK_TAGS.start))


# (does a template whose prompts with thinking on and off are these write it?, format);
# the first that says yes wins.
_DETECTION: tuple[tuple[Callable[[str, str], bool], ReasoningFormat], ...] = (
    (_writes_think_tags, THINK_TAGS),
)


class _Phase(enum.Enum):
    AWAIT_START = "await_start"   # no trace yet; the output may open one
    REASONING = "reasoning"       # inside the trace
    CONTENT = "content"           # the answer (after the trace, or there is none)


class ReasoningSplitter:
    """Splits one completion's text, streamed in pieces, into reasoning and content.

    `prompt_text` is the rendered prompt (or only its end): it says whether the template
    left the trace open or closed. Call `feed(text)` with each new piece of output and
    `finish()` once at the end; joining what they return gives the same reasoning and
    content whichever way the text was cut into pieces.
    """

    def __init__(self, fmt: ReasoningFormat, prompt_text: str = "") -> None:
        self.fmt = fmt
        self.reasoning_tokens = 0    # tokens from the output's start through the end marker
        self._pending_tokens = 0     # tokens fed while it is undecided whether a trace opens
        self._buf = ""               # held-back output text, not yet released
        self._reasoning_started = False   # a reasoning character was released
        self._strip_content_newlines = False
        if prompt_text.rstrip().endswith(fmt.end):
            self._phase = _Phase.CONTENT
            self._strip_content_newlines = True
        elif prompt_opens_trace(fmt, prompt_text):
            self._phase = _Phase.REASONING
        else:
            self._phase = _Phase.AWAIT_START

    @property
    def in_reasoning(self) -> bool:
        """True while the output is (or may still be) inside the trace."""
        return self._phase is not _Phase.CONTENT

    @property
    def trace_open(self) -> bool:
        """True once a trace has certainly opened and has not been closed yet."""
        return self._phase is _Phase.REASONING

    def feed(self, text: str, num_tokens: int = 0) -> tuple[str, str]:
        """Take the next piece of output, made by `num_tokens` tokens (for the
        reasoning-token count); return the (reasoning, content) it releases."""
        if self._phase is _Phase.REASONING:
            self.reasoning_tokens += num_tokens
        elif self._phase is _Phase.AWAIT_START:
            self._pending_tokens += num_tokens
        self._buf += text
        return self._release(final=False)

    def finish(self) -> tuple[str, str]:
        """The output is complete: release everything still held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, str]:
        # One piece may cross both markers, so the phases run in order, not as elif.
        if self._phase is _Phase.AWAIT_START and not self._await_start(final):
            return "", ""
        reasoning = self._release_reasoning(final) if self._phase is _Phase.REASONING else ""
        content = self._release_content() if self._phase is _Phase.CONTENT else ""
        return reasoning, content

    def _await_start(self, final: bool) -> bool:
        """Decide whether the output opens a trace; False while it is still undecided."""
        head = self._buf.lstrip()
        if head.startswith(self.fmt.start):
            self._buf = head[len(self.fmt.start):]
            self._phase = _Phase.REASONING
            self.reasoning_tokens += self._pending_tokens
        elif not final and self.fmt.start.startswith(head):
            return False   # only whitespace and perhaps the first characters of the marker
        else:
            self._phase = _Phase.CONTENT   # no trace: the text is released untouched
        self._pending_tokens = 0
        return True

    def _release_reasoning(self, final: bool) -> str:
        at = self._buf.find(self.fmt.end)
        if at >= 0:
            released = self._buf[:at].rstrip("\n")
            self._buf = self._buf[at + len(self.fmt.end):]
            self._phase = _Phase.CONTENT
            self._strip_content_newlines = True
        elif final:   # cut off inside the trace: all of it is reasoning
            released, self._buf = self._buf.rstrip("\n"), ""
        else:
            cut = len(self._buf) - _undecided_tail(self._buf, self.fmt.end)
            released, self._buf = self._buf[:cut], self._buf[cut:]
        if not self._reasoning_started:
            released = released.lstrip("\n")
            self._reasoning_started = bool(released)
        return released

    def _release_content(self) -> str:
        if self._strip_content_newlines:
            self._buf = self._buf.lstrip("\n")
            self._strip_content_newlines = not self._buf
        released, self._buf = self._buf, ""
        return released


def _undecided_tail(text: str, marker: str) -> int:
    """Length of the end of `text` that must wait: trailing newlines (dropped if the
    marker follows) and a proper prefix of `marker` (the marker may be arriving)."""
    prefix = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1)
                   if text.endswith(marker[:k])), 0)
    cut = len(text) - prefix
    while cut > 0 and text[cut - 1] == "\n":
        cut -= 1
    return len(text) - cut


def split_reasoning(fmt: ReasoningFormat, text: str, prompt_text: str = "") -> tuple[str, str]:
    """(reasoning, content) of a whole completion: the non-streamed message."""
    splitter = ReasoningSplitter(fmt, prompt_text)
    reasoning, content = splitter.feed(text)
    last_reasoning, last_content = splitter.finish()
    return reasoning + last_reasoning, content + last_content


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
