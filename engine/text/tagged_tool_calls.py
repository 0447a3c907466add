"""The tagged tool-call formats, hermes and qwen3_coder: calls between `<tool_call>` and
`</tool_call>`, parsed out of the answer's text as it streams.

  hermes (Qwen3, Qwen3-MoE, Qwen2.5)     qwen3_coder (Qwen3.5, Qwen3-Coder)
      <tool_call>                            <tool_call>
      {"name": "get_weather",                <function=get_weather>
       "arguments": {"city": "Paris"}}       <parameter=city>
      </tool_call>                           Paris
                                             </parameter>
                                             </function>
                                             </tool_call>

`TaggedToolCalls` releases content up to where a `<tool_call>` may begin, holds a call
until its `</tool_call>` and parses it whole; a call that does not parse, or that the
end cuts off, goes out as content, as written. The whitespace that follows a call is the
format's and is dropped. qwen3_coder's parameter values, written bare, take the type that
the tool's JSON schema gives them.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from engine.text.tool_calls import ToolCall, ToolCallFormat, call_from_json

if TYPE_CHECKING:
    from engine.text.reasoning import TraceSplitter

OPEN, CLOSE = "<tool_call>", "</tool_call>"


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
            return call_from_json(json.loads(body))
        except json.JSONDecodeError:
            return None


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
                call = self._fmt.parse_call(body, self._tools)
                self._in_call, self._after_call = False, call is not None
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
