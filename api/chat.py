"""`POST /v1/chat/completions`: messages rendered with the model's chat template.

The template is the served checkpoint's own `chat_template.jinja` when it ships one,
else the model's. For a model with a reasoning format (the server's --reasoning-parser,
else the one the template rendering the request writes), the engine's text pipeline
splits each choice's output: with `separate_reasoning` (the default) the trace goes to
`reasoning_content` (mirrored as `reasoning`) and the answer to `content`; without, the
text stays whole in `content` and the trace's tokens are still counted. This module only
shapes the deltas.

`reasoning_effort` sets a thinking budget, ceil(effort * reasoning budget) tokens, after
which the engine forces the format's end marker; the reasoning budget is the server's
--reasoning-budget, else the request's token limit, else the context the prompt leaves.
It applies only when the prompt opens the trace (not with `enable_thinking=false`).

With `tools` (and tool_choice "auto", their default), the calls that the answer makes in
the template's tool-call format (the server's --tool-call-parser, else the one the
template asks for) come out of `content` into `tool_calls`, and a choice that made any
and then stopped finishes with "tool_calls"; streamed, each call is one delta, sent
whole once its end is generated. With `parallel_tool_calls=false` a choice keeps its
first call only (the model is not stopped after it). Without a known format the calls
stay in the content.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from api.errors import APIError
from api.generation import Generation
from api.logprobs import LogprobFormatter
from api.protocol import ChatCompletionRequest, ChatRendering
from api.sse import sse_response
from api.state import Accepted, ResolvedModel, accept, server_state
from engine import ReasoningOptions, RequestOutput, ToolCallOptions
from engine.text.reasoning import ReasoningFormat, thinking_budget
from engine.text.tool_calls import ToolCall

bp = Blueprint("chat", __name__)

# render_chat's own arguments: chat_template_kwargs may not set them.
_RENDER_ARGUMENTS = {"add_generation_prompt", "continue_final_message", "tools", "chat_template"}


@bp.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    job = accept(ChatCompletionRequest)
    req, gen, tokenizer = job.req, job.generation, job.engine.tokenizer
    prompt_text, fmt = render_chat_prompt(req, req.messages, job.model)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    reasoning = None if fmt is None else ReasoningOptions(
        fmt, separate=req.separate_reasoning, budget=_thinking_budget(job, len(prompt_ids)))
    gen.submit([prompt_ids], job.params, req.n, job.model.checkpoint, reasoning,
               _tool_call_options(req, job.model, fmt))
    chat = _Chat(req, gen, LogprobFormatter(tokenizer))
    if req.stream:
        return sse_response(chat.chunks(), gen)
    return jsonify(chat.response())


def _thinking_budget(job: Accepted, num_prompt_tokens: int) -> int | None:
    """The trace tokens that the request's reasoning_effort allows (None: no limit): a
    fraction of the server's --reasoning-budget, else of the request's token limit, else
    of the context the prompt leaves. The engine applies it if the prompt opens a trace."""
    effort = job.req.reasoning_effort
    if effort is None:
        return None
    limits = (server_state().config.reasoning_budget, job.params.max_tokens)
    budget = next((limit for limit in limits if limit is not None),
                  max(0, job.engine.max_model_len - num_prompt_tokens))
    return thinking_budget(effort, budget)


def _tool_call_options(req: ChatCompletionRequest, model: ResolvedModel,
                       fmt: ReasoningFormat | None) -> ToolCallOptions | None:
    """How the answer's tool calls are parsed; None where they stay in the content (no
    tools, tool_choice "none", or no format known for the template)."""
    if not req.parses_tool_calls:
        return None
    tool_format = server_state().tool_call_format(model)
    if tool_format is None:
        return None
    if tool_format.reasoning is not None and tool_format.reasoning is not fmt:
        raise APIError(400, f"the {tool_format.name} tool-call format is read through the "
                       f"{tool_format.reasoning.name} reasoning format, which this request's "
                       "template does not write", param="tools")
    return ToolCallOptions(tool_format, req.tools)


def render_chat_prompt(req: ChatRendering, messages: list[dict],
                       model: ResolvedModel) -> tuple[str, ReasoningFormat | None]:
    """The prompt chat completions send for `messages` (and /tokenize shows), with the
    reasoning format of the template that renders it. A format that takes the effort
    natively (harmony) hears it through the template, unless chat_template_kwargs say
    otherwise; an effort for a model without a format is a 400."""
    fmt = server_state().reasoning_format(model, req.tools)
    if req.reasoning_effort is not None and fmt is None:
        model_name = f"the model `{req.model}`" if req.model else "this model"
        raise APIError(400, f"{model_name} does not support reasoning_effort: its chat "
                       "template writes no reasoning trace known to pokeserve (a server "
                       "started with --reasoning-parser names one)", param="reasoning_effort")
    kwargs = {**(fmt.template_kwargs(req.reasoning_effort) if fmt else {}),
              **req.chat_template_kwargs}
    text = render_prompt(server_state().engine.tokenizer, messages, kwargs,
                         chat_template=model.chat_template, tools=req.tools,
                         add_generation_prompt=req.add_generation_prompt,
                         continue_final_message=req.continue_final_message)
    return text, fmt


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
    def __init__(self, req: ChatCompletionRequest, gen: Generation, fmt: LogprobFormatter) -> None:
        self.req, self.gen, self.fmt = req, gen, fmt

    def _logprobs(self, out: RequestOutput) -> list[dict]:
        if not self.req.logprobs:
            return []
        return self.fmt.chat(out.token_ids, out.logprobs, out.top_logprobs)


    def _kept(self, calls: list[ToolCall], num_made: int) -> list[ToolCall]:
        """Of a choice's new `calls`, after `num_made` before them, those it answers with."""
        return calls if self.req.parallel_tool_calls else calls[:max(0, 1 - num_made)]

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": f"chatcmpl-{self.gen.id}", "object": obj, "created": self.gen.created,
                "model": self.req.model, "choices": choices}

    def response(self) -> dict:
        texts = [["", ""] for _ in self.gen.choices]   # [reasoning, content] per choice
        calls: list[list[ToolCall]] = [[] for _ in self.gen.choices]
        logprobs: list[list[dict]] = [[] for _ in self.gen.choices]
        try:
            for choice, out in self.gen.outputs():
                texts[choice.index][0] += out.reasoning
                texts[choice.index][1] += out.content
                calls[choice.index] += self._kept(out.tool_calls, len(calls[choice.index]))
                logprobs[choice.index] += self._logprobs(out)
        finally:
            self.gen.abort()
        choices = [{"index": c.index, "message": _message(*texts[c.index], calls[c.index]),
                    "logprobs": {"content": logprobs[c.index]} if self.req.logprobs else None,
                    "finish_reason": _finish_reason(c.finish_reason, bool(calls[c.index]))}
                   for c in self.gen.choices]
        return {**self._envelope("chat.completion", choices), "usage": self.gen.usage()}

    def chunks(self) -> Iterator[dict]:
        usage = {"usage": None} if self.req.include_usage else {}
        obj = "chat.completion.chunk"
        for choice in self.gen.choices:
            yield {**self._envelope(obj, [{"index": choice.index, "logprobs": None,
                                           "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]), **usage}
        pending: list[list[dict]] = [[] for _ in self.gen.choices]   # logprobs not yet sent
        num_calls = [0] * len(self.gen.choices)
        for choice, out in self.gen.outputs():
            pending[choice.index] += self._logprobs(out)
            # Reasoning, content and each call released together go out as chunks of their
            # own, in that order, so that no chunk mixes them.
            deltas = [d for d in (_delta(reasoning=out.reasoning), _delta(content=out.content)) if d]
            for call in self._kept(out.tool_calls, num_calls[choice.index]):
                deltas.append({"tool_calls": [_tool_call(call, num_calls[choice.index])]})
                num_calls[choice.index] += 1
            if out.finished and not deltas:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                logprobs = {"content": pending[choice.index]} if self.req.logprobs else None
                pending[choice.index] = []
                finish_reason = _finish_reason(out.finish_reason, num_calls[choice.index] > 0)
                yield {**self._envelope(obj, [{
                    "index": choice.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason if out.finished and last else None}]),
                    **usage}
        if self.req.include_usage:
            yield {**self._envelope(obj, []), "usage": self.gen.usage()}


def _message(reasoning: str, content: str, calls: list[ToolCall]) -> dict:
    # `reasoning` mirrors `reasoning_content` (vLLM's newer name), so either client works.
    trace = reasoning or None
    message = {"role": "assistant", "content": content, "reasoning_content": trace,
               "reasoning": trace}
    if calls:   # as OpenAI answers a call: no content is null, not ""
        message.update(content=content or None, tool_calls=[_tool_call(c) for c in calls])
    return message


def _tool_call(call: ToolCall, index: int | None = None) -> dict:
    """A call as OpenAI writes it; `index` (the call's place in the choice) when streamed."""
    written = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": call.name, "arguments": call.arguments}}
    return written if index is None else {"index": index, **written}


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """A choice that called tools and then stopped finished to have them run."""
    return "tool_calls" if called and reason == "stop" else reason


def _delta(reasoning: str = "", content: str = "") -> dict:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta
