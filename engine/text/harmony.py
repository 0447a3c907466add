"""gpt-oss's harmony format: reasoning and answer in channels, split on token ids.

A harmony conversation is a list of messages, each written as

    <|start|>{role}<|channel|>{channel}<|message|>{body}<|end|>

(the header may also name a recipient, ` to=functions.x`, and a `<|constrain|>json`
type). The chat template ends the prompt with `<|start|>assistant`, so the output opens
with the rest of a header. The model thinks in the `analysis` channel, answers in
`final`, and calls tools in `commentary`; its last message ends with `<|return|>` (or
`<|call|>` for a tool call) instead of `<|end|>`, and both end the sequence (one line):

    <|channel|>analysis<|message|>User asks 2+2.<|end|>
    <|start|>assistant<|channel|>final<|message|>4<|return|>

The markers are special tokens, which detokenization drops, so the split works on token
ids: `HarmonySplitter` follows the messages token by token, decodes each body on its
own, and sends analysis bodies to reasoning and every other channel's to content, with
no markup left. A marker is one token, so no text waits for a marker to complete; only a
header waits for its `<|message|>`, which says where the body goes.

A tool call is a message whose header names a function as its recipient:

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
    <|message|>{"city": "Paris"}<|call|>

With tool calls asked for (`HarmonyToolCalls`, the `openai` tool-call format), such a
message's body is held and becomes a `ToolCall` when the message ends, its arguments the
body's JSON (the body as written, if it is not JSON); a call that the end cuts off is
content. Without, its body is content like any other channel's.

`reasoning_effort` is native to gpt-oss (the template writes `Reasoning: low|medium|high`
into its system message): `harmony_effort` maps the engine's effort fraction onto the
three levels. A thinking budget works as for `<think>` models, forcing `FORCED_FINAL`:
the analysis message is closed and a final one opened.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence

from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.reasoning import ReasoningFormat, TraceSplitter
from engine.text.tokenizer import Tokenizer
from engine.text.tool_calls import ToolCall, ToolCallFormat, ToolCallParser, json_arguments

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL = "<|return|>", "<|call|>"
REASONING_CHANNEL = "analysis"
# What the engine forces when the thinking budget is spent inside an analysis message.
FORCED_FINAL = f"{END}{START}assistant{CHANNEL}final{MESSAGE}"
# Where the chat template leaves the prompt: a harmony template renders this last.
GENERATION_PROMPT = f"{START}assistant"
INLINE_SEPARATOR = "\n\n"   # between messages when the trace stays inline in content
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([\w-]+)")
_FUNCTION_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")

# gpt-oss's three levels, each with the effort fraction it stops below (so the API's
# names land where they should: minimal 0.01 and low 0.3 -> low, medium 0.6, high 0.9).
_EFFORT_LEVELS = ((0.45, "low"), (0.75, "medium"), (float("inf"), "high"))


def harmony_effort(effort: float) -> str:
    """The template's `reasoning_effort` for an effort fraction in [0, 1]: low below
    0.45, medium below 0.75, high otherwise."""
    return next(level for bound, level in _EFFORT_LEVELS if effort < bound)


def renders_harmony(prompt_text: str) -> bool:
    """True when a rendered generation prompt is harmony's (it ends with the opened
    assistant header): the check the reasoning-format table runs on what a template renders."""
    return prompt_text.endswith(GENERATION_PROMPT)


class Harmony(ReasoningFormat):
    """The format: harmony's channels, recognised by the generation prompt it renders."""

    name = "harmony"
    forced_end = FORCED_FINAL

    def writes(self, thinking_prompt: str, no_thinking_prompt: str) -> bool:
        return renders_harmony(thinking_prompt)

    def opens_trace(self, prompt_end: str) -> bool:
        return renders_harmony(prompt_end)

    def splitter(self, tokenizer: Tokenizer, prompt_ids: list[int], prompt_end: str,
                 separate: bool) -> HarmonySplitter:
        return HarmonySplitter(tokenizer, prompt_ids, separate_reasoning=separate)

    def template_kwargs(self, effort: float | None) -> dict:
        """gpt-oss's template takes `reasoning_effort` itself (its system message's
        `Reasoning: low|medium|high`); without one it uses its own default."""
        return {} if effort is None else {"reasoning_effort": harmony_effort(effort)}


HARMONY = Harmony()


class _Phase(enum.Enum):
    HEADER = "header"     # after <|start|>: role, channel, recipient, up to <|message|>
    BODY = "body"         # a message's text
    BETWEEN = "between"   # after <|end|>: the next message's <|start|> is due


class HarmonySplitter:
    """Splits one completion's tokens, fed as they are generated, into reasoning and content.

    The `TraceSplitter` interface (`engine.text.reasoning`), fed token ids instead of
    text: `feed(ids)` returns the (reasoning, content) the new tokens release, `finish()`
    the rest; `reasoning_tokens` counts the tokens of analysis bodies. `prompt_ids` (or
    only their end) set where the output starts, normally inside the header that the
    template's `<|start|>assistant` opened. With `separate_reasoning=False` everything is
    content: each message's body in turn, separated by a blank line.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 separate_reasoning: bool = True) -> None:
        self._tokenizer = tokenizer
        self._separate = separate_reasoning
        to_id = tokenizer.hf.convert_tokens_to_ids
        self._start, self._message = to_id(START), to_id(MESSAGE)
        self._ends = {to_id(END), to_id(RETURN), to_id(CALL)}
        self.reasoning_tokens = 0
        self._phase = _Phase.BETWEEN
        self._header: list[int] = []
        self._channel: str | None = None
        self._body: IncrementalDetokenizer | None = None
        self.calls_tools = False       # set by HarmonyToolCalls: function messages are calls
        self._call: str | None = None  # the function the current body calls
        self._call_args: list[str] = []
        self._calls: list[ToolCall] = []
        self._answered = False        # a message on a channel other than analysis began
        self._body_released = False   # the current body has released text
        self._released = False        # some body has
        # The prompt's last message may still be open (the generation prompt's header).
        starts = [i for i, token in enumerate(prompt_ids) if token == self._start]
        for token in prompt_ids[starts[-1]:] if starts else ():
            self._step(token)
        self.reasoning_tokens = 0

    @property
    def in_reasoning(self) -> bool:
        """True while the output is, or may still turn out to be, reasoning: until a
        message on another channel (the answer) begins."""
        return not self._answered

    @property
    def trace_open(self) -> bool:
        """True inside an analysis message's body, where a budget may force FORCED_FINAL."""
        return self._phase is _Phase.BODY and self._channel == REASONING_CHANNEL

    def feed(self, token_ids: Iterable[int]) -> tuple[str, str]:
        """Take the next output tokens; return the (reasoning, content) they release."""
        reasoning, content = [], []
        for token in token_ids:
            text = self._step(token)
            if self._call is not None:
                self._call_args.append(text)
                if self._phase is not _Phase.BODY:   # the call's message ended
                    self._end_call()
                continue
            text = self._released_text(text)
            (reasoning if self._is_reasoning() else content).append(text)
        return "".join(reasoning), "".join(content)

    def take_tool_calls(self) -> list[ToolCall]:
        """The calls whose messages ended since the last take."""
        calls, self._calls = self._calls, []
        return calls

    def feed_token(self, token_id: int, text: str) -> tuple[str, str]:
        """`feed` for one token (the TraceSplitter interface): its text is not needed,
        each body is decoded on its own."""
        return self.feed([token_id])

    def finish(self) -> tuple[str, str]:
        """The output is complete (or cut off): release the text still held back."""
        if self._phase is not _Phase.BODY:
            return "", ""   # an unfinished header holds no text
        text = self._body.flush()
        if self._call is not None:     # cut off: the call is content, as written
            text, self._call = "".join(self._call_args) + text, None
        text = self._released_text(text)
        return (text, "") if self._is_reasoning() else ("", text)

    def _is_reasoning(self) -> bool:
        return self._separate and self._channel == REASONING_CHANNEL

    def _step(self, token: int) -> str:
        """Advance by one token; the body text it completes."""
        if token in self._ends:                       # <|end|>, <|return|>, <|call|>
            text = self._body.flush() if self._phase is _Phase.BODY else ""
            self._phase = _Phase.BETWEEN
            return text
        if token == self._start:
            self._phase, self._header = _Phase.HEADER, []
            return ""
        if self._phase is _Phase.HEADER:
            if token == self._message:
                self._open_body(*self._route_of(self._header))
            else:
                self._header.append(token)
            return ""
        if self._phase is _Phase.BETWEEN:             # text outside any message: content
            self._open_body(None)
        if self._channel == REASONING_CHANNEL:
            self.reasoning_tokens += 1
        return self._body.add(token)

    def _open_body(self, channel: str | None, call: str | None = None) -> None:
        self._phase, self._channel = _Phase.BODY, channel
        self._call, self._call_args = (call if self.calls_tools else None), []
        self._answered |= channel != REASONING_CHANNEL
        self._body = IncrementalDetokenizer(self._tokenizer, [])
        self._body_released = False

    def _released_text(self, text: str) -> str:
        """Inline, a body's first text is set off from the body before it by a blank line."""
        if text and not self._body_released:
            if not self._separate and self._released:
                text = INLINE_SEPARATOR + text
            self._body_released = self._released = True
        return text

    def _end_call(self) -> None:
        self._calls.append(ToolCall(self._call, json_arguments("".join(self._call_args))))
        self._call = None

    def _route_of(self, header: list[int]) -> tuple[str | None, str | None]:
        """`assistant<|channel|>commentary to=functions.f` -> ("commentary", "f"): the
        channel named (None if none) and the function the message calls (None if none)."""
        text = self._tokenizer.decode(header, skip_special_tokens=False)
        channel, function = _CHANNEL_NAME.search(text), _FUNCTION_RECIPIENT.search(text)
        return channel and channel.group(1), function and function.group(1)


class HarmonyToolCalls(ToolCallFormat):
    """The `openai` tool-call format: calls are harmony messages to `functions.*`, read
    off the token ids by the output's HarmonySplitter."""

    name = "openai"
    reasoning = HARMONY

    def writes(self, prompt: str) -> bool:
        return renders_harmony(prompt)

    def parser(self, tools: list[dict], splitter: TraceSplitter | None) -> ToolCallParser:
        if not isinstance(splitter, HarmonySplitter):
            raise ValueError("harmony tool calls are read through the harmony reasoning format")
        splitter.calls_tools = True
        return _SplitterCalls(splitter)


class _SplitterCalls:
    """The ToolCallParser of harmony: the splitter holds calls out of the content itself."""

    def __init__(self, splitter: HarmonySplitter) -> None:
        self._splitter = splitter

    def feed(self, content: str) -> tuple[str, list[ToolCall]]:
        return content, self._splitter.take_tool_calls()

    def finish(self) -> tuple[str, list[ToolCall]]:
        return "", self._splitter.take_tool_calls()


HARMONY_TOOL_CALLS = HarmonyToolCalls()
