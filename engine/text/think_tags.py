"""The `<think>...</think>` format (Qwen3, Qwen3.5, DeepSeek-R1): the trace between two
text markers, then the answer.

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
from dataclasses import dataclass

from engine.text.reasoning import ReasoningFormat
from engine.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class ThinkTags(ReasoningFormat):
    """A trace between two text markers."""

    name: str
    start: str        # opens the trace, e.g. "<think>"
    end: str          # closes it, e.g. "</think>"
    forced_end: str   # the end marker written as the template itself closes a trace

    def writes(self, thinking_prompt: str, no_thinking_prompt: str) -> bool:
        """The prompt ends inside an open trace (DeepSeek-R1-style templates, which never
        close it themselves, and the demo's), or with thinking off after an empty closed
        trace (Qwen3, whose prompt with thinking on leaves the opening to the model)."""
        closed = no_thinking_prompt.rstrip()
        return self.opens_trace(thinking_prompt) or (
            closed.endswith(self.end)
            and closed.removesuffix(self.end).rstrip().endswith(self.start))

    def opens_trace(self, prompt_end: str) -> bool:
        return prompt_end.rstrip().endswith(self.start)

    def splitter(self, tokenizer: Tokenizer, prompt_ids: list[int], prompt_end: str,
                 separate: bool) -> ReasoningSplitter:
        return ReasoningSplitter(self, prompt_end, separate)


THINK_TAGS = ThinkTags(name="think", start="<think>", end="</think>", forced_end="\n</think>\n\n")


class _Phase(enum.Enum):
    AWAIT_START = "await_start"   # no trace yet; the output may open one
    REASONING = "reasoning"       # inside the trace
    CONTENT = "content"           # the answer (after the trace, or there is none)


class ReasoningSplitter:
    """Splits one completion's text, streamed in pieces, into reasoning and content.

    `prompt_text` is the rendered prompt (or only its end): it says whether the template
    left the trace open or closed. Call `feed(text)` with each new piece of output and
    `finish()` once at the end; joining what they return gives the same reasoning and
    content whichever way the text was cut into pieces. With `separate=False` every piece
    is released at once as content, and the trace is still followed and counted.
    """

    def __init__(self, fmt: ThinkTags, prompt_text: str = "", separate: bool = True) -> None:
        self.fmt = fmt
        self.separate = separate
        self.reasoning_tokens = 0    # tokens from the output's start through the end marker
        self._pending_tokens = 0     # tokens fed while it is undecided whether a trace opens
        self._buf = ""               # held-back output text, not yet released
        self._reasoning_started = False   # a reasoning character was released
        self._strip_content_newlines = False
        if prompt_text.rstrip().endswith(fmt.end):
            self._phase = _Phase.CONTENT
            self._strip_content_newlines = True
        elif fmt.opens_trace(prompt_text):
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
        released = self._release(final=False)
        return released if self.separate else ("", text)

    def feed_token(self, token_id: int, text: str) -> tuple[str, str]:
        """`feed` for one token's text (the TraceSplitter interface)."""
        return self.feed(text, num_tokens=1)

    def finish(self) -> tuple[str, str]:
        """The output is complete: release everything still held back."""
        released = self._release(final=True)
        return released if self.separate else ("", "")

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


def split_reasoning(fmt: ThinkTags, text: str, prompt_text: str = "") -> tuple[str, str]:
    """(reasoning, content) of a whole completion: the non-streamed message."""
    splitter = ReasoningSplitter(fmt, prompt_text)
    reasoning, content = splitter.feed(text)
    last_reasoning, last_content = splitter.finish()
    return reasoning + last_reasoning, content + last_content


