"""Tool calls in an answer: what a tool-call format is, and what a call is.

A chat request with `tools` lets the model call them, each family in its own format,
named as vLLM's --tool-call-parser names them:

  hermes (Qwen3, Qwen3-MoE)        <tool_call>{"name": "f", "arguments": {...}}</tool_call>
  qwen3_coder (Qwen3.5, 3.6)       <tool_call><function=f><parameter=x>1</parameter>...
  llama3_json (Llama 3.1-3.3)      the answer is the call: {"name": "f", "parameters": {...}}
  openai (gpt-oss)                 a harmony message addressed `to=functions.f`

The first two are engine/text/tagged_tool_calls.py, llama3_json is
engine/text/json_tool_calls.py, and harmony's is read off the token ids by
engine/text/harmony.py. A format's parser takes the calls out of the answer as it is
released (after the reasoning split and stop strings): what is not a call, or a call that
does not parse or that the end cuts off, is content, so no text is lost. A call's
arguments are a JSON object's text, as OpenAI's `function.arguments` has them.
engine/text/tool_call_formats.py keeps the table, by name and by what a template renders.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.text.reasoning import ReasoningFormat, TraceSplitter

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


def call_from_json(call: Any) -> ToolCall | None:
    """`{"name": "f", "arguments": {...}}` (or `"parameters"`, Llama's word) as a call;
    None when it is not one."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def json_arguments(text: str) -> str:
    """A call's arguments as written: a JSON object's text, compact; other text as it is."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    return json.dumps(parsed, ensure_ascii=False) if isinstance(parsed, dict) else text.strip()
