"""Server-Sent Events: `data: <json>\\n\\n` per chunk, `data: [DONE]\\n\\n` at the end.

An error after the stream started goes out as `data: {"error": {...}}` and the stream
ends; a client that disconnects (the WSGI server closes the body iterator, or the
request thread sees it while waiting) has its sequences aborted at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Response

from api.errors import APIError, ClientGone, log
from api.generation import Generation

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events: Iterator[dict], generation: Generation) -> Response:
    def body() -> Iterator[str]:
        try:
            for event in events:
                yield sse_event(event)
            yield DONE
        except ClientGone:
            return
        except APIError as exc:
            yield sse_event(exc.body())
            yield DONE
        except Exception as exc:   # a bug: report it in the stream, keep the server up
            log.exception("error while streaming a response")
            yield sse_event(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body())
            yield DONE
        finally:
            generation.abort()   # no-op for finished sequences; frees the rest

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(body(), mimetype="text/event-stream", headers=headers)
