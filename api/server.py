"""Serving the app with waitress, a multi-threaded production WSGI server.

The port opens at once and `/health` answers 503 while the engine loads; a failed load
stops the server with an error. HTTP is served from waitress's threads while the main
thread loads the model (the engine's core runs in a process of its own) and then waits
for Ctrl-C or SIGTERM, or for the core to die. Each
streaming client holds one waitress thread for its whole stream, so the pool is sized
well above the engine's batch. `channel_request_lookahead` lets waitress notice a client
that hangs up while its request is still running, so its sequences are aborted.

Waitress refuses a body over `MAX_BODY_BYTES` as soon as it sees its length, before
buffering it; its own refusals (that 413, malformed HTTP, headers too large) go out in
the OpenAI error shape like every other response."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from api.app import create_app
from api.errors import APIError
from api.limits import BODY_TOO_LARGE, MAX_BODY_BYTES
from api.state import ServerConfig

log = logging.getLogger("pokeserve.server")


def serve(load_engine: Callable[[], object], config: ServerConfig, host: str, port: int,
          threads: int) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); return the process exit status."""
    app = create_app(None, config)
    state = app.extensions["pokeserve"]
    # Waitress refuses bodies of max_request_body_size bytes or more.
    server = create_server(app, host=host, port=port, threads=threads,
                           channel_request_lookahead=1, connection_limit=max(100, 2 * threads),
                           max_request_body_size=MAX_BODY_BYTES + 1, ident="pokeserve")
    server.channel_class = _Channel
    signal.signal(signal.SIGTERM, _interrupt)   # `kill` shuts down as cleanly as Ctrl-C
    threading.Thread(target=server.run, name="pokeserve-http", daemon=True).start()
    log.info("listening on http://%s:%s (loading the model)", host, server.effective_port)
    try:
        try:
            state.set_engine(engine := load_engine())
        except KeyboardInterrupt:
            return 0
        except Exception:   # anything at all while loading: report it and stop serving
            log.exception("could not start the engine")
            return 1
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):   # from now on: end cleanly
            signal.signal(signum, lambda *_: stop.set())
        log.info("serving %s on http://%s:%s/v1", ", ".join(state.base_names), host,
                 server.effective_port)
        while not stop.wait(timeout=1.0):
            if not engine.is_alive():   # a bug in the engine: its requests were failed
                log.error("the engine stopped; shutting down")
                return 1
        engine.shutdown()
        log.info("shut down")
        return 0
    finally:
        server.close()
        if state.engine is not None:
            state.engine.shutdown()


class _ErrorTask(ErrorTask):
    """Waitress's answer to a request it refuses itself, in the OpenAI error shape."""

    def execute(self) -> None:
        error = self.request.error   # a waitress.utilities.Error: code, reason, body
        message = BODY_TOO_LARGE if error.code == 413 else f"{error.reason}: {error.body}"
        body = json.dumps(APIError(error.code, message).body()).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _ErrorTask


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
