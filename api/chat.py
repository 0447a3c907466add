"""`POST /v1/chat/completions`: messages rendered with the model's chat template.

The template is the served checkpoint's own `chat_template.jinja` when it ships one,
else the model's. For a model with a reasoning format (the server's --reasoning-parser,
else the one the template rendering the request writes), each choice's text passes through a
`ReasoningSplitter`: with `separate_reasoning` (the default) the trace goes to
`reasoning_content` (mirrored as `reasoning`) and the answer to `content`; without, the
text stays whole in `content` and the splitter only counts the trace's tokens.

`reasoning_effort` sets a thinking budget, ceil(effort * reasoning budget) tokens, after
which the engine forces the format's end marker; the reasoning budget is the server's
--reasoning-budget, else the request's token limit, else the context the prompt leaves.
It applies only when the prompt opens the trace (not with `enable_thinking=false`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from api.errors import APIError
from api.generation import Choice, Generation
from api.logprobs import LogprobFormatter
from api.protocol import ChatCompletionRequest
from api.sse import sse_response
from api.state import Accepted, accept, server_state
from engine import RequestOutput, SamplingParams
from engine.text.reasoning import (
    ReasoningFormat,
    ReasoningSplitter,
    prompt_opens_trace,
    thinking_budget,
)

bp = Blueprint("chat", __name__)

# render_chat's own arguments: chat_template_kwargs may not set them.
_RENDER_ARGUMENTS = {"add_generation_prompt", "continue_final_message", "tools", "chat_template"}


class _Inline:
    """Every piece of text is content: `separate_reasoning=false`, or no reasoning
    format. With a format, a splitter still follows the trace to count its tokens."""

    def __init__(self, counter: ReasoningSplitter | None) -> None:
        self.counter = counter

    @property
    def reasoning_tokens(self) -> int:
        return self.counter.reasoning_tokens if self.counter else 0

    def feed(self, text: str, num_tokens: int = 0) -> tuple[str, str]:
        if self.counter:
            self.counter.feed(text, num_tokens)
        return "", text

    def finish(self) -> tuple[str, str]:
        return "", ""


def _output_splitter(req: ChatCompletionRequest, fmt: ReasoningFormat | None,
                     prompt_text: str) -> ReasoningSplitter | _Inline:
    splitter = ReasoningSplitter(fmt, prompt_text) if fmt else None
    return splitter if splitter and req.separate_reasoning else _Inline(splitter)


@bp.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    job = accept(ChatCompletionRequest)
    req, gen, tokenizer = job.req, job.generation, job.engine.tokenizer
    prompt_text = render_prompt(tokenizer, req.messages, req.chat_template_kwargs,
                                chat_template=job.model.chat_template, tools=req.tools,
                                add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message)
    fmt = server_state().reasoning_format(job.model, req.tools)
    if req.reasoning_effort is not None and fmt is None:
        raise APIError(400, f"the model `{req.model}` does not support reasoning_effort: its "
                       "chat template writes no reasoning trace known to pokeserve (a "
                       "server started with --reasoning-parser names one)",
                       param="reasoning_effort")
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    params = _with_thinking_budget(job, fmt, prompt_text, len(prompt_ids))
    gen.submit([prompt_ids], params, req.n, job.model.checkpoint)
    splitters = [_output_splitter(req, fmt, prompt_text) for _ in gen.choices]
    chat = _Chat(req, splitters, gen, LogprobFormatter(tokenizer))
    if req.stream:
        return sse_response(chat.chunks(), gen)
    return jsonify(chat.response())


def _with_thinking_budget(job: Accepted, fmt: ReasoningFormat | None, prompt_text: str,
                          num_prompt_tokens: int) -> SamplingParams:
    """The request's sampling params, plus the thinking budget its reasoning_effort sets
    when the prompt opens a trace for the output to think in."""
    effort = job.req.reasoning_effort
    if effort is None or not prompt_opens_trace(fmt, prompt_text):
        return job.params
    limits = (server_state().config.reasoning_budget, job.params.max_tokens)
    budget = next((limit for limit in limits if limit is not None),
                  max(0, job.engine.max_model_len - num_prompt_tokens))
    end_ids = job.engine.tokenizer.encode(fmt.forced_end, add_special_tokens=False)
    return dataclasses.replace(job.params, reasoning_format=fmt, thinking_end_ids=end_ids,
                               thinking_budget=thinking_budget(effort, budget),
                               thinking_open_at_start=True)


def render_prompt(tokenizer, messages: list[dict], template_kwargs: dict, **render_args) -> str:
    """The chat template's text for `messages`; 400 for anything the template refuses."""
    clashing = sorted(set(template_kwargs) & _RENDER_ARGUMENTS)
    if clashing:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clashing)}",
                       param="chat_template_kwargs")
    if render_args.get("chat_template") is None and not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template, so it cannot serve "
                       "/v1/chat/completions; use /v1/completions", param="model")
    try:
        return tokenizer.render_chat(messages, **render_args, **template_kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


class _Chat:
    def __init__(self, req: ChatCompletionRequest, splitters: list[ReasoningSplitter | _Inline],
                 gen: Generation, fmt: LogprobFormatter) -> None:
        self.req, self.splitters, self.gen, self.fmt = req, splitters, gen, fmt

    def _split(self, choice: Choice, out: RequestOutput) -> tuple[str, str]:
        splitter = self.splitters[choice.index]
        reasoning, content = splitter.feed(out.text, len(out.token_ids))
        if out.finished:
            last_reasoning, last_content = splitter.finish()
            reasoning, content = reasoning + last_reasoning, content + last_content
        return reasoning, content

    def _logprobs(self, out: RequestOutput) -> list[dict]:
        if not self.req.logprobs:
            return []
        return self.fmt.chat(out.token_ids, out.logprobs, out.top_logprobs)

    def _usage(self) -> dict:
        return self.gen.usage(sum(s.reasoning_tokens for s in self.splitters))

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": f"chatcmpl-{self.gen.id}", "object": obj, "created": self.gen.created,
                "model": self.req.model, "choices": choices}

    def response(self) -> dict:
        texts = [["", ""] for _ in self.gen.choices]   # [reasoning, content] per choice
        logprobs: list[list[dict]] = [[] for _ in self.gen.choices]
        try:
            for choice, out in self.gen.outputs():
                reasoning, content = self._split(choice, out)
                texts[choice.index][0] += reasoning
                texts[choice.index][1] += content
                logprobs[choice.index] += self._logprobs(out)
        finally:
            self.gen.abort()
        choices = [{"index": c.index, "message": _message(*texts[c.index]),
                    "logprobs": {"content": logprobs[c.index]} if self.req.logprobs else None,
                    "finish_reason": c.finish_reason} for c in self.gen.choices]
        return {**self._envelope("chat.completion", choices), "usage": self._usage()}

    def chunks(self) -> Iterator[dict]:
        usage = {"usage": None} if self.req.include_usage else {}
        obj = "chat.completion.chunk"
        for choice in self.gen.choices:
            yield {**self._envelope(obj, [{"index": choice.index, "logprobs": None,
                                           "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]), **usage}
        pending: list[list[dict]] = [[] for _ in self.gen.choices]   # logprobs not yet sent
        for choice, out in self.gen.outputs():
            reasoning, content = self._split(choice, out)
            pending[choice.index] += self._logprobs(out)
            # Reasoning and content released together go out as two chunks, reasoning
            # first, so that no chunk mixes the two.
            deltas = [d for d in (_delta(reasoning=reasoning), _delta(content=content)) if d]
            if out.finished and not deltas:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                logprobs = {"content": pending[choice.index]} if self.req.logprobs else None
                pending[choice.index] = []
                yield {**self._envelope(obj, [{
                    "index": choice.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": out.finish_reason if out.finished and last else None}]),
                    **usage}
        if self.req.include_usage:
            yield {**self._envelope(obj, []), "usage": self._usage()}


def _message(reasoning: str, content: str) -> dict:
    # `reasoning` mirrors `reasoning_content` (vLLM's newer name), so either client works.
    trace = reasoning or None
    return {"role": "assistant", "content": content, "reasoning_content": trace,
            "reasoning": trace}


def _delta(reasoning: str = "", content: str = "") -> dict:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta
