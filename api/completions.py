"""`POST /v1/completions`: raw text continuation, no chat template.

A prompt is a string, a list of strings, a list of token ids or a list of such lists;
choice `prompt_index * n + i` is sample `i` of prompt `prompt_index`. `echo` puts the
prompt in front of the text (and, with `logprobs`, its tokens in front of the logprobs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from flask import Blueprint, Response, jsonify

from api.generation import Choice, Generation
from api.logprobs import LogprobFormatter, merge_completion_logprobs
from api.protocol import CompletionRequest
from api.sse import sse_response
from api.state import accept
from engine import RequestOutput

bp = Blueprint("completions", __name__)


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None   # None: given as token ids, decoded once the engine has taken them


@dataclass
class _ChoiceText:
    """What one choice has produced so far."""

    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    offset: int = 0      # text_offset of the next token
    started: bool = False


@bp.post("/v1/completions")
def create_completion() -> Response:
    job = accept(CompletionRequest)
    req, gen, tokenizer = job.req, job.generation, job.engine.tokenizer
    prompts = _prompts(tokenizer, req.prompt)
    # Submitted before any decoding: the engine refuses ids outside the vocabulary (400),
    # on which the tokenizer would fail.
    gen.submit([p.ids for p in prompts], job.params, req.n, job.model.checkpoint)
    for p in prompts:
        p.text = tokenizer.decode(p.ids, skip_special_tokens=False) if p.text is None else p.text
    completion = _Completion(req, prompts, gen, LogprobFormatter(tokenizer))
    if req.stream:
        return sse_response(completion.chunks(), gen)
    return jsonify(completion.response())


def _prompts(tokenizer, prompt) -> list[_Prompt]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt[0], int):
        prompt = [prompt]
    return [_Prompt(tokenizer.encode(p), p) if isinstance(p, str) else _Prompt(p, None)
            for p in prompt]


class _Completion:
    def __init__(self, req: CompletionRequest, prompts: list[_Prompt], gen: Generation,
                 fmt: LogprobFormatter) -> None:
        self.req, self.prompts, self.gen, self.fmt = req, prompts, gen, fmt
        self.states = [_ChoiceText() for _ in gen.choices]

    def _piece(self, choice: Choice, out: RequestOutput) -> tuple[str, dict | None]:
        """The text and logprobs this output adds to its choice (the prompt first, with echo)."""
        st, prompt = self.states[choice.index], self.prompts[choice.prompt_index]
        text, parts = out.text, []
        if not st.started and self.req.echo:
            text = prompt.text + text
            if self.req.logprobs is not None:
                parts.append(self.fmt.completion(prompt.ids, out.prompt_logprobs,
                                                 out.prompt_top_logprobs, 0))
                st.offset = len(prompt.text)
        st.started = True
        if self.req.logprobs is not None:
            parts.append(self.fmt.completion(out.token_ids, out.logprobs, out.top_logprobs,
                                             st.offset))
            st.offset += sum(len(t) for t in parts[-1]["tokens"])
        return text, merge_completion_logprobs(parts) if parts else None

    def _choice(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": f"cmpl-{self.gen.id}", "object": "text_completion",
                "created": self.gen.created, "model": self.req.model, "choices": choices}

    def response(self) -> dict:
        try:
            for choice, out in self.gen.outputs():
                text, logprobs = self._piece(choice, out)
                st = self.states[choice.index]
                st.text += text
                if logprobs is not None:
                    st.logprobs.append(logprobs)
        finally:
            self.gen.abort()
        choices = [self._choice(c.index, self.states[c.index].text,
                                merge_completion_logprobs(self.states[c.index].logprobs)
                                if self.req.logprobs is not None else None, c.finish_reason)
                   for c in self.gen.choices]
        return {**self._envelope(choices), "usage": self.gen.usage()}

    def chunks(self) -> Iterator[dict]:
        usage = {"usage": None} if self.req.include_usage else {}
        for choice, out in self.gen.outputs():
            text, logprobs = self._piece(choice, out)
            if text or out.finished or logprobs is not None:
                choice_json = self._choice(choice.index, text, logprobs,
                                           out.finish_reason if out.finished else None)
                yield {**self._envelope([choice_json]), **usage}
        if self.req.include_usage:
            yield {**self._envelope([]), "usage": self.gen.usage()}
