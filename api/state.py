"""What every route shares: the server's options, the engine (once loaded), the metrics,
and the resolution of a request's `model` to the base model or a checkpoint, with the
chat template that goes with it, and the reasoning and tool-call formats of the template
in use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, request

from api.errors import APIError, engine_error
from api.generation import Generation
from api.metrics import Metrics
from api.protocol import parse_request
from engine import Engine
from engine.checkpoints.errors import CheckpointError
from engine.checkpoints.store import CheckpointInfo
from engine.sampling_params import SamplingParams
from engine.text.reasoning import PROBE_MESSAGES, ReasoningFormat
from engine.text.reasoning_formats import detect_reasoning_format, reasoning_format_by_name
from engine.text.tool_call_formats import detect_tool_call_format, tool_call_format_by_name
from engine.text.tool_calls import PROBE_TOOLS, ToolCallFormat


@dataclass(frozen=True)
class ServerConfig:
    api_keys: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()   # names of the base model; default: its dir name
    reasoning_parser: str | None = None   # a reasoning format's name; default: from the template
    reasoning_budget: int | None = None   # tokens reasoning_effort=1 allows; default: the
                                          # request's token limit, else the context left
    max_queued_requests: int | None = None   # 429 once this many wait for the engine
    tool_call_parser: str | None = None   # a tool-call format's name; default: from the template

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            reasoning_format_by_name(self.reasoning_parser)   # ValueError naming the known ones
        if self.tool_call_parser is not None:
            tool_call_format_by_name(self.tool_call_parser)
        if self.reasoning_budget is not None and self.reasoning_budget < 1:
            raise ValueError(f"reasoning_budget must be at least 1, got {self.reasoning_budget}")


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint: CheckpointInfo | None   # resolved once per request; None: the base model
    chat_template: str | None   # the checkpoint's own template, else None (the model's)


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    engine: Engine | None = None   # once loaded
    started: float = field(default_factory=time.time)

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics.watch(engine)

    def engine_alive(self) -> bool:
        return self.engine is not None and self.engine.is_alive()

    def require_engine(self) -> Engine:
        """The engine, or a 503 while it loads or after it stopped, or a 429 while too
        many requests already wait for it."""
        if self.engine is None:
            raise APIError(503, "the model is still loading; try again shortly",
                           code="model_loading")
        if not self.engine_alive():
            raise APIError(503, "the engine has stopped", code="engine_stopped")
        limit = self.config.max_queued_requests
        if limit is not None and self.engine.stats().num_waiting >= limit:
            raise APIError(429, f"the server is over capacity ({limit} requests are already "
                           "waiting); try again shortly", code="server_overloaded")
        return self.engine

    @property
    def base_names(self) -> tuple[str, ...]:
        engine = self.require_engine()
        return self.config.served_model_names or (engine.model_name,)

    def resolve_model(self, name: str) -> ResolvedModel:
        """The base model or the servable checkpoint `name` means: 404 unknown, 409 still
        being written, 400 invalid."""
        engine = self.require_engine()
        if name in self.base_names or name in (engine.model_name, str(engine.model_dir)):
            return ResolvedModel(None, None)
        try:
            info = engine.checkpoints.resolve(name)
        except CheckpointError as exc:
            raise engine_error(exc) from None
        if info is None:
            return ResolvedModel(None, None)
        template = info.chat_template.read_text() if info.chat_template else None
        return ResolvedModel(info, template)

    def reasoning_format(self, model: ResolvedModel,
                         tools: list[dict] | None) -> ReasoningFormat | None:
        """The server's --reasoning-parser, else the format of the template that renders
        this request: the checkpoint's own, else the model's, of whose named templates
        `tools` may pick another."""
        if self.config.reasoning_parser is not None:
            return reasoning_format_by_name(self.config.reasoning_parser)
        tokenizer = self.engine.tokenizer
        return detect_reasoning_format(lambda thinking: tokenizer.render_chat(
            list(PROBE_MESSAGES), chat_template=model.chat_template, tools=tools,
            enable_thinking=thinking))

    def tool_call_format(self, model: ResolvedModel) -> ToolCallFormat | None:
        """The server's --tool-call-parser, else the format that the template in use (the
        checkpoint's own, else the model's) asks for when it is given tools."""
        if self.config.tool_call_parser is not None:
            return tool_call_format_by_name(self.config.tool_call_parser)
        tokenizer = self.engine.tokenizer
        return detect_tool_call_format(lambda: tokenizer.render_chat(
            list(PROBE_MESSAGES), chat_template=model.chat_template, tools=list(PROBE_TOOLS)))

    def model_cards(self) -> list[dict]:
        """`/v1/models` entries: the base model's names, then every complete checkpoint."""
        engine = self.require_engine()
        card = {"object": "model", "owned_by": "pokeserve", "max_model_len": engine.max_model_len}
        cards = [{**card, "id": name, "created": int(self.started), "root": str(engine.model_dir),
                  "parent": None} for name in self.base_names]
        cards += [{**card, "id": info.name, "created": int(info.created), "root": str(info.source),
                   "parent": self.base_names[0]} for info in engine.checkpoints.list()]
        return cards


def server_state() -> ServerState:
    return current_app.extensions["pokeserve"]


@dataclass
class Accepted:
    """A generation request that passed validation, ready for its prompt to be built."""

    req: Any                 # the endpoint's pydantic request
    params: SamplingParams
    model: ResolvedModel
    engine: Engine
    generation: Generation


def accept(request_cls: type) -> Accepted:
    """Validate the current request's body (400), resolve its model (404/409/400) and
    check the engine is up (503)."""
    req = parse_request(request_cls, request.get_data())
    params = req.to_sampling_params()
    state = server_state()
    model = state.resolve_model(req.model)
    engine = state.require_engine()
    return Accepted(req, params, model, engine,
                    Generation(engine, state.metrics, disconnected_callback()))


def disconnected_callback():
    """`() -> bool`: whether this request's client has gone (waitress can tell when its
    `channel_request_lookahead` is on; other servers cannot, and it stays False)."""
    return request.environ.get("waitress.client_disconnected") or (lambda: False)
