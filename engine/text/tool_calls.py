"""Tool calls in an answer: what a tool-call format is, and the tagged formats parsed
out of the answer's text as it streams.

A chat request with `tools` lets the model call them, each family in its own format
(named as vLLM's --tool-call-parser names them):

  hermes (Qwen3, Qwen3-MoE, Qwen2.5)     qwen3_coder (Qwen3.5, Qwen3-Coder)
      <tool_call>                            <tool_call>
      {"name": "get_weather",                <function=get_weather>
       "arguments": {"city": "Paris"}}       <parameter=city>
      </tool_call>                           Paris
                                             </parameter>
                                             </function>
                                             </tool_call>

and openai (gpt-oss): a harmony message addressed `to=functions.get_weather`, its body
the arguments' JSON, which engine/text/harmony.py reads off the token ids.

The tagged formats are parsed from the answer's text, after stop strings:
`TaggedToolCalls` releases content up to where a `<tool_call>` may begin, holds a call
until its `</tool_call>` and parses it whole. A call that does not parse, or that the
end cuts off, goes out as content, as written, so no text is lost; the whitespace that
follows a call is the format's and is dropped. A call's
arguments are a JSON object's text, as OpenAI's `function.arguments`: qwen3_coder's
parameter values, written bare, take the type that the tool's JSON schema gives them.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.text.reasoning import ReasoningFormat, TraceSplitter

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The tool a template is rendered with to see which format it writes.
PROBE_TOOLS: tuple[dict, ...] = ({"type": "function", "function": {
    "name": "probe", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}},)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str   # a JSON object's text (the model's own, where it wrote invalid JSON)


class ToolCallParser(Protocol):
    """Pulls one completion's tool calls out of its answer, fed as it is released."""

    def feed(self, content: str) -> tuple[str, list[ToolCall]]:
        """The answer's next text -> (content released, calls completed)."""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output is complete (or cut off): release what is still held back."""


class ToolCallFormat(ABC):
    """One family's way of writing tool calls."""

    name: str
    reasoning: ReasoningFormat | None = None   # the trace format it is read through, if any

    @abstractmethod
    def writes(self, prompt: str) -> bool:
        """Whether a template whose prompt for a conversation with PROBE_TOOLS is
        `prompt` asks for calls in this format."""

    @abstractmethod
    def parser(self, tools: list[dict], splitter: TraceSplitter | None) -> ToolCallParser:
        """A parser for one output; `splitter` is the output's reasoning splitter."""


class TaggedFormat(ToolCallFormat):
    """Calls between `<tool_call>` and `</tool_call>`, each parsed whole."""

    def parser(self, tools: list[dict], splitter: TraceSplitter | None) -> TaggedToolCalls:
        return TaggedToolCalls(self, tools)

    @abstractmethod
    def parse_call(self, body: str, tools: list[dict]) -> ToolCall | None:
        """The call written between the tags; None when it is not one."""


class Hermes(TaggedFormat):
    name = "hermes"

    def writes(self, prompt: str) -> bool:
        return OPEN in prompt and not QWEN3_CODER.writes(prompt)

    def parse_call(self, body: str, tools: list[dict]) -> ToolCall | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class Qwen3Coder(TaggedFormat):
    name = "qwen3_coder"
    _FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
    # A value sits on lines of its own: the newlines around it are the format's.
    _PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def writes(self, prompt: str) -> bool:
        return OPEN in prompt and "<function=" in prompt

    def parse_call(self, body: str, tools: list[dict]) -> ToolCall | None:
        function = self._FUNCTION.fullmatch(body)
        if function is None:
            return None
        name = function[1].strip()
        schema = _parameter_schemas(tools, name)
        arguments = {key.strip(): _typed(value, schema.get(key.strip()))
                     for key, value in self._PARAMETER.findall(function[2])}
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _parameter_schemas(tools: list[dict], name: str) -> dict:
    """The JSON schemas of tool `name`'s parameters, by parameter name ({} if unknown)."""
    for tool in tools:
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties")
            return properties if isinstance(properties, dict) else {}
    return {}


def _typed(value: str, schema: Any) -> Any:
    """A bare parameter value as its schema's type: text for strings (and for unknown
    parameters), else the JSON it reads as (`3`, `true`, `[1, 2]`), else the text."""
    kind = schema.get("type") if isinstance(schema, dict) else "string"
    if kind == "string":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def json_arguments(text: str) -> str:
    """A call's arguments as written: a JSON object's text, compact; other text as it is."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    return json.dumps(parsed, ensure_ascii=False) if isinstance(parsed, dict) else text.strip()


HERMES, QWEN3_CODER = Hermes(), Qwen3Coder()


class TaggedToolCalls:
    """The `ToolCallParser` of a tagged format."""

    def __init__(self, fmt: TaggedFormat, tools: list[dict]) -> None:
        self._fmt, self._tools = fmt, tools
        self._held = ""            # text not released yet
        self._in_call = False      # inside <tool_call>: `_held` is the call's body so far
        self._after_call = False   # a call closed and no content has followed it yet

    def feed(self, content: str) -> tuple[str, list[ToolCall]]:
        self._held += content
        released, calls = [], []
        while True:
            if self._in_call:
                end = self._held.find(CLOSE)
                if end < 0:
                    break
                body, self._held = self._held[:end], self._held[end + len(CLOSE):]
                self._in_call, self._after_call = False, True
                call = self._fmt.parse_call(body, self._tools)
                if call is None:
                    released.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                continue
            start = self._held.find(OPEN)
            if start < 0:     # all but what may still become a <tool_call>
                start = len(self._held) - _partial_tag(self._held)
                released.append(self._content(self._held[:start]))
                self._held = self._held[start:]
                break
            released.append(self._content(self._held[:start]))
            self._held, self._in_call = self._held[start + len(OPEN):], True
        return "".join(released), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = (OPEN if self._in_call else "") + self._held
        self._held, self._in_call = "", False
        return self._content(rest), []

    def _content(self, text: str) -> str:
        """Content to release: after a call, without the whitespace that follows it."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that `<tool_call>` starts with."""
    return next((n for n in range(min(len(text), len(OPEN) - 1), 0, -1)
                 if OPEN.startswith(text[-n:])), 0)
