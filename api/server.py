"""Serving the app with waitress, a multi-threaded production WSGI server.

The port opens at once and `/health` answers 503 while the engine loads; a failed load
stops the server with an error. HTTP is served from waitress's threads while the main
thread loads the model (the engine's core runs in a process of its own) and then waits
for Ctrl-C or SIGTERM, or for the core to die. Each
streaming client holds one waitress thread for its whole stream, so the pool is sized
well above the engine's batch. `channel_request_lookahead` lets waitress notice a client
that hangs up while its request is still running, so its sequences are aborted."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from waitress import create_server

from api.app import create_app
from api.state import ServerConfig

log = logging.getLogger("pokeserve.server")


def serve(load_engine: Callable[[], object], config: ServerConfig, host: str, port: int,
          threads: int) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); return the process exit status."""
    app = create_app(None, config)
    state = app.extensions["pokeserve"]
    server = create_server(app, host=host, port=port, threads=threads,
                           channel_request_lookahead=1, connection_limit=max(100, 2 * threads),
                           ident="pokeserve")
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
