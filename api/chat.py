"""`POST /v1/chat/completions`: messages rendered with the model's chat template.

The template is the served checkpoint's own `chat_template.jinja` when it ships one,
else the model's. Each choice's text passes through an output splitter that divides it
into reasoning and content; today it is `_AllContent`, and the reasoning splitter
(`engine.reasoning.ReasoningSplitter`, same `feed`/`finish` interface) plugs in at
`_output_splitter` for `separate_reasoning`.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from api.errors import APIError
from api.generation import Choice, Generation
from api.logprobs import LogprobFormatter
from api.protocol import ChatCompletionRequest
from api.sse import sse_response
from api.state import accept
from engine import RequestOutput

bp = Blueprint("chat", __name__)

# render_chat's own arguments: chat_template_kwargs may not set them.
_RENDER_ARGUMENTS = {"add_generation_prompt", "continue_final_message", "tools", "chat_template"}


class _AllContent:
    """No reasoning split: every piece of text is content."""

    def feed(self, text: str, num_tokens: int = 0) -> tuple[str, str]:
        return "", text

    def finish(self) -> tuple[str, str]:
        return "", ""


def _output_splitter(req: ChatCompletionRequest, prompt_text: str) -> _AllContent:
    return _AllContent()


@bp.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    job = accept(ChatCompletionRequest)
    req, gen, tokenizer = job.req, job.generation, job.engine.tokenizer
    prompt_text = render_prompt(tokenizer, req.messages, req.chat_template_kwargs,
                                chat_template=job.model.chat_template, tools=req.tools,
                                add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    gen.submit([prompt_ids], job.params, req.n, job.model.checkpoint)
    chat = _Chat(req, prompt_text, gen, LogprobFormatter(tokenizer))
    if req.stream:
        return sse_response(chat.chunks(), gen)
    return jsonify(chat.response())


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
    def __init__(self, req: ChatCompletionRequest, prompt_text: str, gen: Generation,
                 fmt: LogprobFormatter) -> None:
        self.req, self.gen, self.fmt = req, gen, fmt
        self.splitters = [_output_splitter(req, prompt_text) for _ in gen.choices]

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
        return {**self._envelope("chat.completion", choices), "usage": self.gen.usage()}

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
            delta = _delta(reasoning, content)
            if delta or out.finished:
                logprobs = {"content": pending[choice.index]} if self.req.logprobs else None
                pending[choice.index] = []
                yield {**self._envelope(obj, [{
                    "index": choice.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": out.finish_reason if out.finished else None}]), **usage}
        if self.req.include_usage:
            yield {**self._envelope(obj, []), "usage": self.gen.usage()}


def _message(reasoning: str, content: str) -> dict:
    # `reasoning` mirrors `reasoning_content` (vLLM's newer name), so either client works.
    trace = reasoning or None
    return {"role": "assistant", "content": content, "reasoning_content": trace,
            "reasoning": trace}


def _delta(reasoning: str, content: str) -> dict:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta
