"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic.

Types are strict (a string where a number belongs is an error, as in the OpenAI API);
unknown fields are accepted and ignored, which is how the SDK's `extra_body` arrives.
Ranges that `SamplingParams` already checks are left to it, and token ids to the engine
(it knows the vocabulary), so each rule lives once; what is checked here is the HTTP
layer's own: the body's nesting and text, the bounds of `api.limits`, and the shape of
chat messages (text only, whatever the model).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from api import limits
from api.errors import APIError
from api.limits import MAX_LOGPROBS
from engine import SamplingParams
from engine.text.reasoning import parse_reasoning_effort

ROLES = ("system", "developer", "user", "assistant", "tool")
# Message fields that chat templates read as text, when a message has them.
_TEXT_FIELDS = ("name", "tool_call_id", "reasoning_content", "reasoning", "thinking")
_TEXT_PART = '{"type": "text", "text": "..."}'
# JSON's \\u escapes can write halves of a UTF-16 pair alone, which are not text.
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN = frozenset({int, float, bool, type(None)})   # JSON values with no text, no nesting


def _check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where}.role must be a string")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}")
        _check_content(message.get("content"), f"{where}.content")
        for key in _TEXT_FIELDS:
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ValueError(f"{where}.{key} must be a string")
        if message.get("tool_calls") is not None:
            messages[i] = {**message, "tool_calls": _template_tool_calls(
                message["tool_calls"], f"{where}.tool_calls")}
    return messages


def _template_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's calls as chat templates read them: OpenAI sends each call's
    arguments as JSON text, templates (Qwen3.5's, gpt-oss's) iterate them as an object."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ValueError(f"{where} must be a list of objects")
    read = []
    for j, call in enumerate(calls):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}[{j}].function must be an object with a name")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}[{j}].function.arguments must be a JSON object")
        read.append({**call, "function": {**function, "arguments": arguments}})
    return read


def _check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    for i, tool in enumerate(tools or ()):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{...}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def _check_content(content: Any, where: str) -> None:
    """A string, or a list of text parts: this server serves text, for every model."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" and isinstance(kind, str):
            raise ValueError(f"{where}[{j}] has type {kind[:40]!r}, but this server serves "
                             f"text only: content parts must be {_TEXT_PART}")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}]: content parts must be {_TEXT_PART}")


Messages = Annotated[list[dict[str, Any]],
                     Field(min_length=1, max_length=limits.MAX_MESSAGES),
                     AfterValidator(_check_messages)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = Field(1, ge=1, le=limits.MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=limits.MAX_STOP_TOKEN_IDS)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=limits.MAX_LOGIT_BIAS)
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > limits.MAX_STOP_STRINGS:
            raise ValueError(f"at most {limits.MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) > limits.MAX_STOP_STRING_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {limits.MAX_STOP_STRING_CHARS} "
                             "characters")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self) -> None:
        """Rules that span fields; raise APIError (400)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        try:
            bias = {int(token): value for token, value in self.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=self.stop,
                stop_token_ids=self.stop_token_ids, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, logit_bias=bias,
                ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_GenerationRequest):
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    reasoning_effort: Any = None   # refused: raw text has no template to open a trace

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        def ints(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or ints(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(ints(p) for p in value)):
            if len(value) > limits.MAX_PROMPTS:
                raise ValueError(f"at most {limits.MAX_PROMPTS} prompts, got {len(value)}")
            return value
        raise ValueError("prompt must be a string, a list of strings, a non-empty list of "
                         "token ids, or a list of such lists")

    @property
    def num_prompts(self) -> int:
        nested = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return len(self.prompt) if nested else 1

    def to_sampling_params(self) -> SamplingParams:
        self.check()
        if self.num_prompts * self.n > limits.MAX_CHOICES:
            raise APIError(400, f"prompts x n may be at most {limits.MAX_CHOICES}, got "
                           f"{self.num_prompts} x {self.n}", param="n")
        if self.reasoning_effort is not None:
            raise APIError(400, "reasoning_effort is only supported on /v1/chat/completions",
                           param="reasoning_effort")
        # echo with logprobs scores the prompt too, as vLLM does.
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(self.max_tokens, self.logprobs or 0, prompt_logprobs)


class ChatRendering(_Request):
    """How chat messages are rendered into a prompt: what chat and /tokenize share."""

    model: str | None = None
    tools: Annotated[list[dict[str, Any]] | None, Field(max_length=limits.MAX_TOOLS),
                     AfterValidator(_check_tools)] = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    reasoning_effort: Any = None   # a name or a number; validated to a float in [0, 1]

    @field_validator("reasoning_effort")
    @classmethod
    def _effort(cls, value: Any) -> float | None:
        """A name or a number in, the fraction of the reasoning budget it allows out."""
        try:
            return None if value is None else parse_reasoning_effort(value)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("reasoning_effort ")) from None


class ChatCompletionRequest(_GenerationRequest, ChatRendering):
    messages: Messages
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    separate_reasoning: bool = True
    response_format: dict[str, Any] | None = None   # accepted; not enforced
    tool_choice: str | dict[str, Any] | None = None   # "auto" where tools are given
    parallel_tool_calls: bool = True   # False: a choice's first call only, as vLLM does

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the answer's tool calls are taken out into `tool_calls`."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, dict):
            raise APIError(400, "tool_choice \"required\" or a named function needs decoding "
                           "constrained to the tools, which pokeserve does not do; use "
                           "\"auto\" or \"none\"", param="tool_choice")
        if choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                           "a named function", param="tool_choice")
        if choice == "auto" and not self.tools:
            raise APIError(400, "tool_choice is only allowed when tools are given",
                           param="tool_choice")

    def to_sampling_params(self) -> SamplingParams:
        self.check()
        self._check_tool_choice()
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both "
                           "be true", param="continue_final_message")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        return self.sampling_params(max_tokens, self.top_logprobs or 0)


class TokenizeRequest(ChatRendering):
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def parse_request(model: type[_Request], raw: bytes) -> Any:
    """Validate a raw JSON body into `model`; an APIError (400) naming the first bad field."""
    try:
        body = json.loads(raw)
    except RecursionError:   # the parser's own bound, far above ours
        raise APIError(400, _too_deep(None)) from None
    except ValueError as exc:   # includes bad UTF-8
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_json(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{field}: {message}" if field else message,
                       param=str(err["loc"][0]) if err["loc"] else None) from None


def _check_json(body: dict) -> None:
    """400 for a body nested more than MAX_JSON_DEPTH deep or holding a string that is not
    Unicode text, naming the top-level field it is in. A stack, not recursion."""
    # (container, its depth, the top-level field it is in)
    stack: list[tuple[dict | list, int, str | None]] = [(body, 1, None)]
    while stack:
        container, depth, field = stack.pop()
        if depth > limits.MAX_JSON_DEPTH:
            raise APIError(400, _too_deep(field), param=field)
        if isinstance(container, dict):
            pairs = container.items()
        elif _PLAIN.issuperset(map(type, container)):
            continue   # numbers only, token ids say: nothing inside to check (a fast test)
        else:
            pairs = ((None, v) for v in container)
        for key, child in pairs:
            where = field or key
            _check_text(key, where)
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, where))
            else:
                _check_text(child, where)


def _check_text(value: Any, field: str) -> None:
    if isinstance(value, str) and _SURROGATE.search(value):
        raise APIError(400, f"{field}: a string holds a lone UTF-16 surrogate (a \\ud800 to "
                       "\\udfff escape without its pair), which is not text", param=field)


def _too_deep(field: str | None) -> str:
    where = f"{field}: " if field else ""
    return (f"{where}the request body nests arrays and objects more than "
            f"{limits.MAX_JSON_DEPTH} levels deep")
