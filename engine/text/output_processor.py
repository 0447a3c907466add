"""Turns each step's sampled tokens into RequestOutputs and decides when a sequence ends.

Runs in the engine thread. Per sequence it keeps an incremental detokenizer and a
stop-string matcher, so that only text that can no longer turn out to be part of a
stop string is released, and a sequence stops in the step its stop string completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.model_runner import SeqStepResult
from engine.outputs import RequestOutput
from engine.sequence import Sequence
from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.reasoning import ReasoningSplitter
from engine.text.stop_checker import StopChecker
from engine.text.tokenizer import Tokenizer


@dataclass
class TextState:
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    # Prompt logprobs arrive chunk by chunk; they are sent with the first token.
    prompt_logprobs: list[float | None] = field(default_factory=lambda: [None])
    prompt_top_logprobs: list = field(default_factory=lambda: [None])
    # Follows the reasoning trace while a thinking budget may still run out.
    thinking: ReasoningSplitter | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        p = seq.params
        seq.text_state = TextState(
            IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, p.skip_special_tokens),
            StopChecker(p.stop_strings, p.include_stop_str_in_output))
        if p.thinking_budget is not None:
            fmt = p.reasoning_format
            seq.text_state.thinking = ReasoningSplitter(fmt, fmt.start if p.thinking_open_at_start else "")
            self._check_thinking_budget(seq)

    def process(self, seq: Sequence, result: SeqStepResult) -> RequestOutput | None:
        """Apply one step's result to `seq`; the RequestOutput to send, if any."""
        state = seq.text_state
        state.prompt_logprobs += result.prompt_logprobs
        state.prompt_top_logprobs += result.prompt_top_logprobs
        if result.token_id is None:
            return None
        out = RequestOutput(seq.request_id)
        if seq.wants_prompt_logprobs:
            seq.prompt_logprobs_done = True
            out.prompt_logprobs = state.prompt_logprobs
            out.prompt_top_logprobs = state.prompt_top_logprobs
        self._first_output_fields(seq, out)
        token = result.token_id
        seq.output_ids.append(token)
        if seq.forced_ids:
            seq.forced_ids.popleft()  # the sampler put it in this step
        out.token_ids, out.logprobs = [token], [result.logprob]
        if seq.params.logprobs:
            out.top_logprobs = [result.top_logprobs]
        new_text = state.detokenizer.add(token)
        if state.thinking is not None:
            state.thinking.feed(new_text, num_tokens=1)
            self._check_thinking_budget(seq)
        self._finish_if_stopped(seq, token, new_text, out)
        return out

    @staticmethod
    def _check_thinking_budget(seq: Sequence) -> None:
        """Once the trace has used its budget, queue the end marker to be forced next."""
        state, p = seq.text_state, seq.params
        if not state.thinking.in_reasoning:
            state.thinking = None         # the model closed the trace itself
        elif state.thinking.trace_open and state.thinking.reasoning_tokens >= p.thinking_budget:
            seq.forced_ids.extend(p.thinking_end_ids)
            state.thinking = None

    def _finish_if_stopped(self, seq: Sequence, token: int, new_text: str,
                           out: RequestOutput) -> None:
        p, state = seq.params, seq.text_state
        may_stop = len(seq.output_ids) >= p.min_tokens
        if may_stop and (token in p.stop_token_set or (p.eos_stops and token in self.eos_token_ids)):
            # The stop token's own text is not part of the answer, unless asked for.
            if p.include_stop_str_in_output and token in p.stop_token_set:
                out.text = state.stop_checker.feed(new_text)[0]
            out.text += self._held_back(state)
            return self._finish(out, "stop", token if token in p.stop_token_set else None)
        if may_stop:
            out.text, matched = state.stop_checker.feed(new_text)
            if matched is not None:
                return self._finish(out, "stop", matched)
        else:  # stop strings count only from min_tokens on, as in vLLM
            out.text = state.stop_checker.flush() + new_text
        if (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            out.text += self._held_back(state)
            self._finish(out, "length", None)

    @staticmethod
    def _held_back(state: TextState) -> str:
        """At the end of the text: what may have begun a stop string, then the bytes of an
        unfinished last character (U+FFFD, as `tokenizer.decode` writes them)."""
        return state.stop_checker.flush() + state.detokenizer.flush()

    @staticmethod
    def _finish(out: RequestOutput, reason: str, stop_reason: str | int | None) -> None:
        out.finished, out.finish_reason, out.stop_reason = True, reason, stop_reason

    @staticmethod
    def _first_output_fields(seq: Sequence, out: RequestOutput) -> None:
        if not seq.output_ids:
            out.num_prompt_tokens = seq.num_prompt_tokens
            out.num_cached_tokens = seq.num_cached_tokens
