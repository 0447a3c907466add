"""Serving the app with waitress, a multi-threaded production WSGI server.

The port opens at once and `/health` answers 503 while the engine loads; a failed load
stops the server with an error. HTTP is served from waitress's threads while the main
thread loads the model and then runs the engine loop until Ctrl-C or SIGTERM. Each
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
    """Serve until interrupted (Ctrl-C or SIGTERM); return the process exit status.

    `load_engine` must build the engine with `start=False`: its loop then runs here, on
    the main thread, where PyTorch's CPU thread pool is fastest (see engine.llm_engine).
    """
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
        for signum in (signal.SIGINT, signal.SIGTERM):   # from now on: end the loop cleanly
            signal.signal(signum, lambda *_: engine.shutdown())
        log.info("serving %s on http://%s:%s/v1", ", ".join(state.base_names), host,
                 server.effective_port)
        try:
            engine.run()
        except Exception:   # a bug in the engine loop: its requests were failed; stop serving
            log.exception("the engine loop failed")
            return 1
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
