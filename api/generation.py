"""The engine requests behind one HTTP request, one per (prompt, sample).

Choice `prompt_index * n + i` is sample `i` of prompt `prompt_index` (the OpenAI order).
`outputs()` yields every choice's RequestOutputs as the engine produces them; while it
waits it checks whether the client went away, and `abort()` frees whatever has not
finished (the streaming response calls it when the client disconnects).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from api.errors import ClientGone, engine_error, generation_error
from api.metrics import Metrics
from engine import (
    Engine,
    ReasoningOptions,
    RequestOutput,
    RequestStream,
    SamplingParams,
    ToolCallOptions,
)
from engine.checkpoints.store import CheckpointInfo

# How often a waiting request thread checks whether its client disconnected.
_POLL_SECONDS = 0.5


@dataclass
class Choice:
    index: int
    prompt_index: int
    request_id: str
    stream: RequestStream
    submitted: float
    first_token_at: float | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_reasoning_tokens: int = 0


class Generation:
    def __init__(self, engine: Engine, metrics: Metrics, disconnected: Callable[[], bool]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.disconnected = disconnected
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.n = 1
        self.num_prompt_tokens = 0

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int,
               checkpoint: CheckpointInfo | None, reasoning: ReasoningOptions | None = None,
               tool_calls: ToolCallOptions | None = None) -> None:
        """Queue `n` samples of every prompt (each prompt is computed once for all its
        samples); a refusal aborts those already queued (400)."""
        self.n = n
        try:
            for p, prompt_ids in enumerate(prompts):
                streams = self.engine.add_request(prompt_ids, params, num_samples=n,
                                                  request_id=f"{self.id}-{p}",
                                                  checkpoint=checkpoint, reasoning=reasoning,
                                                  tool_calls=tool_calls)
                self.choices += [Choice(len(self.choices) + i, p, stream.request_id, stream,
                                        time.monotonic()) for i, stream in enumerate(streams)]
        except ValueError as exc:
            self.abort()
            raise engine_error(exc) from None
        self.num_prompt_tokens = sum(map(len, prompts))
        self.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def outputs(self) -> Iterator[tuple[Choice, RequestOutput]]:
        """Every choice's outputs in arrival order, until all have finished."""
        if len(self.choices) == 1:
            choice = self.choices[0]
            outputs = ((choice, out) for out in self._poll(choice.stream.get))
        else:
            outputs = self._poll(self._merged().get)
        for choice, out in outputs:
            self._record(choice, out)
            yield choice, out
            if all(c.finished for c in self.choices):
                return

    def usage(self) -> dict:
        """OpenAI `usage`: each prompt counts once, whatever `n`; cached tokens are the
        prefix-cache hits of each prompt's first sample."""
        prompt_tokens = self.num_prompt_tokens
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        reasoning_tokens = sum(c.num_reasoning_tokens for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self.choices if c.index % self.n == 0)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}

    def abort(self) -> None:
        for choice in self.choices:
            if not choice.finished:
                self.engine.abort(choice.request_id)

    def _poll(self, get: Callable[..., object]) -> Iterator:
        while True:
            try:
                yield get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self.disconnected():
                    self.abort()
                    raise ClientGone() from None

    def _merged(self) -> queue.Queue:
        # One small forwarding thread per choice: each ends with its stream's last output.
        merged: queue.Queue = queue.Queue()

        def forward(choice: Choice) -> None:
            for out in choice.stream:
                merged.put((choice, out))

        for choice in self.choices:
            threading.Thread(target=forward, args=(choice,), daemon=True,
                             name=f"forward-{choice.request_id}").start()
        return merged

    def _record(self, choice: Choice, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.token_ids and choice.first_token_at is None:
            choice.first_token_at = now
            self.metrics.ttft.observe(now - choice.submitted)
        self.metrics.generation_tokens.inc(len(out.token_ids))
        choice.num_output_tokens += len(out.token_ids)
        choice.num_cached_tokens = max(choice.num_cached_tokens, out.num_cached_tokens)
        choice.num_reasoning_tokens = max(choice.num_reasoning_tokens, out.reasoning_tokens)
        if out.finished:
            choice.finished, choice.finish_reason = True, out.finish_reason
            if out.finish_reason == "error":
                raise generation_error(out)
            self.metrics.e2e.observe(now - choice.submitted)
