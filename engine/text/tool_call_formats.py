"""The table of tool-call formats: by name (the server's --tool-call-parser, spelled as
vLLM spells its parsers) and by what a chat template renders.

As for reasoning formats, a model's format is decided by what its chat template renders:
`detect_tool_call_format` renders a short conversation with PROBE_TOOLS and asks each
known format whether the prompt asks for its calls; a new format is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.text.harmony import HARMONY_TOOL_CALLS
from engine.text.json_tool_calls import LLAMA3_JSON
from engine.text.reasoning_formats import format_by_name
from engine.text.tagged_tool_calls import HERMES, QWEN3_CODER
from engine.text.tool_calls import ToolCallFormat

TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    fmt.name: fmt for fmt in (HERMES, QWEN3_CODER, LLAMA3_JSON, HARMONY_TOOL_CALLS)}
# Asked in this order; the first that recognises a template's prompt wins.
_DETECTION_ORDER: tuple[ToolCallFormat, ...] = (HARMONY_TOOL_CALLS, QWEN3_CODER, HERMES,
                                                LLAMA3_JSON)


def tool_call_format_by_name(name: str) -> ToolCallFormat:
    return format_by_name(TOOL_CALL_FORMATS, name, "tool-call format")


def detect_tool_call_format(render: Callable[[], str]) -> ToolCallFormat | None:
    """The format of the calls a chat template asks for, from `render()`, its prompt for
    PROBE_MESSAGES with PROBE_TOOLS and the generation prompt. None: tool calls stay in
    the content as written, also when the template refuses the probe (ValueError)."""
    try:
        prompt = render()
    except ValueError:
        return None
    return next((fmt for fmt in _DETECTION_ORDER if fmt.writes(prompt)), None)
