"""One request's text pipeline: its sampled tokens in, released text out, split into
reasoning and answer.

Per token, in order:
1. the incremental detokenizer turns it into new text (none while a character is
   still incomplete);
2. the reasoning format's splitter sorts the output into reasoning and content (from
   the text for `<think>` tags, from the token ids for harmony), holding back what may
   still be a marker, and counts the trace's tokens;
3. the stop checker releases what of the content can no longer be part of a stop string,
   and says when one completes (stop strings count only from `min_tokens` on, as in
   vLLM). Stop strings apply to the answer: a trace that mentions one goes on;
4. where the request's tools may be called, the tool-call format's parser takes the
   calls out of the released content (engine/text/tool_calls.py);
5. once the trace has used its thinking budget, the pipeline asks for the format's
   forced end marker as the next tokens (`take_forced_ids`).

Token-level ends (EOS, stop token ids, length) are the scheduler's to decide; it tells
`feed` about them, and the pipeline releases what it still holds. The pipeline runs in
the engine loop, so the reasoning trace is split once, where the budget is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.reasoning import ReasoningFormat, TraceSplitter
from engine.text.stop_checker import StopChecker
from engine.text.tokenizer import Tokenizer
from engine.text.tool_calls import ToolCall, ToolCallFormat, ToolCallParser

# Prompt tokens decoded to see how the prompt ends (inside an open trace, after a closed one).
_PROMPT_TAIL_TOKENS = 16


@dataclass(frozen=True)
class ReasoningOptions:
    """How one request's reasoning trace is handled."""

    format: ReasoningFormat
    separate: bool = True        # False: the trace stays inline in `content` (still counted)
    budget: int | None = None    # trace tokens allowed before the end marker is forced;
                                 # applies only when the prompt opens the trace

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"the thinking budget must be >= 0, got {self.budget}")


@dataclass(frozen=True)
class ToolCallOptions:
    """The tools one request's output may call, and the format the model calls them in."""

    format: ToolCallFormat
    tools: list[dict]            # the request's tools (their parameters' JSON schemas)


@dataclass
class TextDelta:
    """What one token releases."""

    reasoning: str = ""             # the trace (when separated)
    content: str = ""               # the answer, stop strings applied, tool calls taken out
    stop_string: str | None = None  # a stop string completed: the sequence ends here
    tool_calls: list[ToolCall] = field(default_factory=list)   # calls completed

    @property
    def text(self) -> str:
        """All the output text released: without a reasoning format, the raw text."""
        return self.reasoning + self.content


class TextPipeline:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 reasoning: ReasoningOptions | None = None,
                 tool_calls: ToolCallOptions | None = None) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopChecker(params.stop_strings, params.include_stop_str_in_output)
        self.params = params
        self.num_tokens = 0
        self.splitter: TraceSplitter | None = None
        self._budget: int | None = None
        self._end_ids: list[int] = []
        if reasoning is not None:
            fmt = reasoning.format
            prompt_end = tokenizer.decode(prompt_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            self.splitter = fmt.splitter(tokenizer, prompt_ids, prompt_end, reasoning.separate)
            if reasoning.budget is not None and fmt.opens_trace(prompt_end):
                self._budget = reasoning.budget
                self._end_ids = tokenizer.encode(fmt.forced_end, add_special_tokens=False)
        self._forced: list[int] = []
        self._check_budget()
        self.tool_calls: ToolCallParser | None = None if tool_calls is None else \
            tool_calls.format.parser(tool_calls.tools, self.splitter)

    @property
    def reasoning_tokens(self) -> int:
        return self.splitter.reasoning_tokens if self.splitter else 0

    def feed(self, token_id: int, ended_by: str | None = None) -> TextDelta:
        """Take the next output token. `ended_by` is the scheduler's verdict on it:
        None (the sequence goes on), "stop" (a stop token or EOS: its own text is not
        output unless it is a requested stop token and include_stop_str_in_output),
        or "length" (its last token)."""
        self.num_tokens += 1
        hidden = ended_by == "stop" and not (self.params.include_stop_str_in_output
                                             and token_id in self.params.stop_token_set)
        text = "" if hidden else self.detokenizer.add(token_id)
        if ended_by is not None:        # a character cut off by the end is released as is
            text += self.detokenizer.flush()
        reasoning, content = self._split(token_id, text, final=ended_by is not None)
        delta = TextDelta(reasoning=reasoning)
        if self.num_tokens < self.params.min_tokens:
            delta.content = self.stops.flush() + content
        else:
            delta.content, delta.stop_string = self.stops.feed(content)
            if ended_by is not None and delta.stop_string is None:
                delta.content += self.stops.flush()
        ends = ended_by is not None or delta.stop_string is not None
        delta.content, delta.tool_calls = self._take_tool_calls(delta.content, ends)
        self._check_budget()
        return delta

    def take_forced_ids(self) -> list[int]:
        """Tokens the engine must put into the sequence next, once (the end of a trace
        whose budget is spent); empty otherwise."""
        forced, self._forced = self._forced, []
        return forced

    def _split(self, token_id: int, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        reasoning, content = self.splitter.feed_token(token_id, text)
        if final:
            last_reasoning, last_content = self.splitter.finish()
            reasoning, content = reasoning + last_reasoning, content + last_content
        return reasoning, content

    def _take_tool_calls(self, content: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self.tool_calls is None:
            return content, []
        content, calls = self.tool_calls.feed(content)
        if final:
            last_content, last_calls = self.tool_calls.finish()
            content, calls = content + last_content, calls + last_calls
        return content, calls

    def _check_budget(self) -> None:
        if self._budget is None:
            return
        if not self.splitter.in_reasoning:
            self._budget = None        # the model closed the trace itself
        elif self.splitter.trace_open and self.splitter.reasoning_tokens >= self._budget:
            self._forced, self._budget = list(self._end_ids), None
