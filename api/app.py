"""The Flask app: routes, API-key check, metrics, and the small routes that need no engine
request (`/health`, `/v1/models`, `/tokenize`, `/detokenize`, `/metrics`)."""

from __future__ import annotations

import hmac

from flask import Flask, Response, jsonify, request

from api import chat, completions
from api.chat import render_chat_prompt
from api.errors import APIError, register_error_handlers
from api.limits import MAX_BODY_BYTES
from api.metrics import Metrics
from api.protocol import DetokenizeRequest, TokenizeRequest, parse_request
from api.state import ResolvedModel, ServerConfig, ServerState, server_state

# Routes counted in pokeserve_requests (others, like /metrics itself, are not).
_COUNTED_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                   "/detokenize"}


def create_app(engine=None, config: ServerConfig | None = None) -> Flask:
    """The server's app. `engine` may come later (`state.set_engine`): until then the
    routes that need it answer 503 and `/health` says the model is loading."""
    app = Flask("pokeserve")
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES   # 413 before the body is read
    state = ServerState(config or ServerConfig(), Metrics())
    if engine is not None:
        state.set_engine(engine)
    app.extensions["pokeserve"] = state
    register_error_handlers(app)
    app.before_request(_check_api_key)
    app.after_request(_count_request)
    app.register_blueprint(completions.bp)
    app.register_blueprint(chat.bp)
    app.add_url_rule("/health", view_func=_health)
    app.add_url_rule("/metrics", view_func=_metrics)
    app.add_url_rule("/v1/models", view_func=_models)
    app.add_url_rule("/tokenize", view_func=_tokenize, methods=["POST"])
    app.add_url_rule("/detokenize", view_func=_detokenize, methods=["POST"])
    return app


def _check_api_key() -> None:
    keys = server_state().config.api_keys
    if not keys or not request.path.startswith("/v1/"):
        return   # /health, /metrics, /tokenize stay open, as in vLLM
    header = request.headers.get("Authorization", "")
    given = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
    # Compare against every key, always, in constant time: no timing hint of a near-miss.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not given or not any(matches):
        raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                       code="invalid_api_key")


def _count_request(response: Response) -> Response:
    if request.path in _COUNTED_ROUTES:
        server_state().metrics.requests.labels(request.path, str(response.status_code)).inc()
    return response


def _health() -> tuple[Response, int]:
    state = server_state()
    if state.engine is None:
        return jsonify({"status": "loading"}), 503
    if not state.engine_alive():
        return jsonify({"status": "engine stopped"}), 503
    return jsonify({"status": "ok"}), 200


def _metrics() -> Response:
    return Response(server_state().metrics.render(), mimetype="text/plain; version=0.0.4")


def _models() -> Response:
    return jsonify({"object": "list", "data": server_state().model_cards()})


def _tokenize() -> Response:
    req: TokenizeRequest = parse_request(TokenizeRequest, request.get_data())
    state = server_state()
    model = state.resolve_model(req.model) if req.model else ResolvedModel(None, None)
    engine = state.require_engine()
    tokenizer = engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages")
    if req.messages is not None:
        text, _ = render_chat_prompt(req, req.messages, model)   # what chat would send
        tokens = tokenizer.encode(text, add_special_tokens=False)
    else:
        tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return jsonify({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})


def _detokenize() -> Response:
    req: DetokenizeRequest = parse_request(DetokenizeRequest, request.get_data())
    engine = server_state().require_engine()
    if any(not 0 <= t < engine.tokenizer.vocab_size for t in req.tokens):
        raise APIError(400, f"tokens must be token ids in [0, {engine.tokenizer.vocab_size})",
                       param="tokens")
    return jsonify({"prompt": engine.tokenizer.decode(req.tokens)})
