"""The engine core's own process: `python -m engine.core_process FD`, started by
`engine.core_client.ProcessCore` with one end of a socket pair as FD.

It reads a `CoreSpec`, builds the core, answers `CoreReady` (or `CoreFailed`), and runs
the loop on its main thread, where PyTorch's CPU thread pool is fastest. A thread
forwards the caller's messages into the loop's inbox; when the caller goes away (the
socket closes, whatever the reason), that thread asks the loop to stop, so the process
never outlives its caller.
"""

from __future__ import annotations

import pickle
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

from engine.engine_core import EngineCore
from engine.messages import CoreFailed, CoreReady, Shutdown


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the caller decides when the core stops
    conn = Connection(fd)
    spec = conn.recv()
    try:
        core = EngineCore(spec.model_dir, spec.config, spec.progress)
    except BaseException as exc:   # the caller raises it as its own
        conn.send(CoreFailed(exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")))
        return 1
    conn.send(CoreReady(core.max_model_len, core.block_manager.num_total_blocks))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_forward, args=(conn, inbox), daemon=True).start()
    core.run(inbox, conn.send)
    return 0


def _forward(conn: Connection, inbox: queue.SimpleQueue) -> None:
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        inbox.put(Shutdown())


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
