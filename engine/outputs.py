"""What the engine thread hands back to callers, one record per request per step."""

from __future__ import annotations

import enum
import queue
from dataclasses import dataclass, field

from engine.text.tool_calls import ToolCall

# (token_id, logprob) pairs, most likely first.
TopLogprobs = list[tuple[int, float]]


class ErrorKind(enum.Enum):
    """Whose problem a failed request is, so that callers need not read the message."""

    CHECKPOINT = "checkpoint"   # its checkpoint cannot be served (found broken when loaded)
    INTERNAL = "internal"       # a bug in the engine


@dataclass
class SeqStepResult:
    """What one step computed for one sequence (the model runner's answer)."""

    token_id: int | None = None                 # None: a prefill chunk that does not sample yet
    logprob: float = 0.0
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: list[float] = field(default_factory=list)          # this chunk's positions
    prompt_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int              # since start
    num_prefix_cached_tokens: int     # since start
    num_computed_prompt_tokens: int   # since start: prompt positions run through the model
    num_unmerged_lora_steps: int = 0  # since start: steps on the unmerged base, adapters in slots
    num_free_state_slots: int = 0     # models with linear-attention layers
    num_total_state_slots: int = 0


@dataclass
class RequestOutput:
    """The new part of one request's output since its previous RequestOutput.

    Logprobs are the log-softmax of the raw logits (before penalties, temperature
    and truncation), so they equal what `compute_logprobs` returns for the same tokens.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] | None = None     # per new token, when asked
    text: str = ""                                     # newly released text
    reasoning: str = ""                                # of it, the reasoning trace (when split)
    content: str = ""                                  # of it, the answer
    tool_calls: list[ToolCall] = field(default_factory=list)   # calls the answer completed
    reasoning_tokens: int = 0                          # so far: the trace's tokens
    finished: bool = False
    finish_reason: str | None = None                   # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None               # the stop string or token id that matched
    error: str | None = None
    error_kind: ErrorKind | None = None                # set with finish_reason "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                         # prompt tokens served by the prefix cache
    prompt_logprobs: list[float | None] | None = None  # first record only; entry 0 is None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


class RequestStream:
    """The caller's end of one request: iterate to receive RequestOutputs until finished."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput] = queue.Queue()

    def put(self, output: RequestOutput) -> None:
        self._queue.put(output)

    def get(self, timeout: float | None = None) -> RequestOutput:
        return self._queue.get(timeout=timeout)

    def __iter__(self):
        while True:
            out = self._queue.get()
            yield out
            if out.finished:
                return
