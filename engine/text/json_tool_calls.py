"""Llama 3.1-3.3's tool calls (`llama3_json`): the answer is the call, a JSON object

    {"name": "get_weather", "parameters": {"city": "Paris"}}

(after `<|python_tag|>`, a special token that detokenization drops unless asked not to),
or several, each after the one before and a `;`. There are no tags: an answer whose
first text is `{` is held to its end and parsed whole, and is the calls if every object
in it is one, else content, as written; any other answer is content as it streams.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from engine.text.tool_calls import ToolCall, ToolCallFormat, call_from_json

if TYPE_CHECKING:
    from engine.text.reasoning import TraceSplitter

# What Llama 3.1's (and 3.2's, 3.3's) template asks of the model when given tools.
_INSTRUCTION = "respond with a JSON for a function call"
PYTHON_TAG = "<|python_tag|>"


class Llama3Json(ToolCallFormat):
    name = "llama3_json"

    def writes(self, prompt: str) -> bool:
        return _INSTRUCTION in prompt

    def parser(self, tools: list[dict], splitter: TraceSplitter | None) -> JsonAnswerCalls:
        return JsonAnswerCalls()


LLAMA3_JSON = Llama3Json()


class JsonAnswerCalls:
    """The `ToolCallParser` of llama3_json."""

    def __init__(self) -> None:
        self._held = ""
        self._calls: bool | None = None   # whether the answer may be calls; None: undecided

    def feed(self, content: str) -> tuple[str, list[ToolCall]]:
        if self._calls is False:
            return content, []
        self._held += content
        start = self._held.lstrip()
        if start and not PYTHON_TAG.startswith(start):   # its first text decides
            self._calls = start.removeprefix(PYTHON_TAG).lstrip()[:1] in ("{", "")
        if self._calls is False:
            released, self._held = self._held, ""
            return released, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        calls = _json_calls(held) if self._calls else None
        return ("", calls) if calls else (held, [])


def _json_calls(text: str) -> list[ToolCall] | None:
    """The calls `text` is, JSON objects each after the one before and a `;`; None
    unless all of it is."""
    decoder, calls, rest = json.JSONDecoder(), [], text.strip().removeprefix(PYTHON_TAG).lstrip()
    while True:
        try:
            obj, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            return None
        call = call_from_json(obj)
        if call is None:
            return None
        calls.append(call)
        rest = rest[end:].strip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        rest = rest[1:].lstrip()
