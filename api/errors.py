"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see goes through here, so the SDK maps each status to its
exception class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...).
A 500 is logged with its traceback and never takes the server down.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from api.limits import BODY_TOO_LARGE
from engine.checkpoints.errors import CheckpointIncomplete, CheckpointNotFound
from engine.outputs import ErrorKind, RequestOutput

log = logging.getLogger("pokeserve.api")

# The OpenAI `type` of each status the server answers with.
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "invalid_request_error", 405: "invalid_request_error",
                409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error response: HTTP status, message for the user, and the OpenAI fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected while its request was being served."""


def engine_error(exc: ValueError) -> APIError:
    """The response for a request the engine refused (checkpoint errors are ValueErrors)."""
    if isinstance(exc, CheckpointNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, CheckpointIncomplete):
        return APIError(409, str(exc), param="model", code="checkpoint_incomplete")
    return APIError(400, str(exc))


def generation_error(out: RequestOutput) -> APIError:
    """The response for a request the engine failed after taking it: a checkpoint found
    broken only when loaded is the user's to fix (400, its own message), the rest a bug."""
    if out.error_kind is ErrorKind.CHECKPOINT:
        return APIError(400, out.error, param="model", code="checkpoint_invalid")
    return APIError(500, f"generation failed: {out.error}")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> tuple[Response, int]:
        return jsonify(exc.body()), exc.status

    @app.errorhandler(ClientGone)
    def _client_gone(exc: ClientGone) -> tuple[Response, int]:
        # Nobody reads this; nginx's 499 "client closed request" keeps the logs honest.
        return Response(status=499), 499

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        # Flask's own 400 (unreadable body), 404 (no such route), 405 (wrong method), 413.
        status = exc.code or 500
        message = BODY_TOO_LARGE if isinstance(exc, RequestEntityTooLarge) else \
            exc.description or exc.name
        return jsonify(APIError(status, message).body()), status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error in a request")
        return jsonify(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body()), 500
