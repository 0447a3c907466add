"""Where an engine's core runs, and how messages reach it.

- `ProcessCore` (the default): the core runs on the main thread of a process of its own
  (`engine.core_process`). On the CPU that is worth a lot: libgomp (PyTorch's OpenMP
  runtime) lets the worker threads of a team started by any thread but the process's
  first spin only briefly, so a loop in a background thread pays a wake-up on each of
  a step's thousand-odd parallel regions (BENCHMARKS.md: 1.3x to 1.6x). The caller's
  threads, the HTTP server's among them, then never hold the core's GIL either.
  Messages cross a socket pair as pickles; the core sends one `StepOutputs` per turn.
- `ThreadCore`: the core in the caller's process, in a background thread (`start=True`)
  or on whichever thread calls `run()`. Its parts stay reachable (`core`), which tests
  and benchmarks of the core itself use.

Both hand every `StepOutputs` to `on_outputs` and call `on_exit` once when the loop has
ended (with the reason, if it did not end by a Shutdown).
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from engine.engine_core import EngineCore
from engine.messages import CoreFailed, CoreReady, CoreSpec, Shutdown, StepOutputs

OnOutputs = Callable[[StepOutputs], None]
OnExit = Callable[[str | None], None]
# How long a core process may take to finish its shutdown before it is killed.
_EXIT_TIMEOUT_S = 30


def _child_env() -> dict[str, str]:
    """The caller's environment, with this very `engine` package first on the path."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class ThreadCore:
    def __init__(self, spec: CoreSpec, on_outputs: OnOutputs, on_exit: OnExit,
                 start: bool = True) -> None:
        self.core = EngineCore(spec.model_dir, spec.config, spec.progress)
        self.ready = CoreReady(self.core.max_model_len, self.core.block_manager.num_total_blocks)
        # SimpleQueue: its put() may be called from a signal handler.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._on_outputs, self._on_exit = on_outputs, on_exit
        self.started = start
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self.run, name="pokeserve-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The core's loop on the calling thread, until shut down."""
        reason = None
        try:
            self.core.run(self.inbox, self._on_outputs)
        except BaseException as exc:
            reason = f"the engine loop failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._on_exit(reason)

    def send(self, msg: object) -> None:
        self.inbox.put(msg)

    def close(self) -> None:
        """Stop the loop; wait for it unless it runs on this very thread."""
        self.send(Shutdown())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


class ProcessCore:
    def __init__(self, spec: CoreSpec, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        ours, theirs = socket.socketpair()
        # A session of its own: a Ctrl-C in the terminal reaches the caller, which then
        # shuts the core down, and not the core directly. stdout and stderr are shared.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.core_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), start_new_session=True, env=_child_env())
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._closing = False
        self._conn.send(spec)
        reply = self._receive_ready()
        if isinstance(reply, CoreFailed):
            self._proc.wait(timeout=_EXIT_TIMEOUT_S)
            raise reply.error
        self.ready: CoreReady = reply
        self._on_outputs, self._on_exit = on_outputs, on_exit
        self._reader = threading.Thread(target=self._read, name="pokeserve-core-reader",
                                        daemon=True)
        self._reader.start()

    def _receive_ready(self) -> CoreReady | CoreFailed:
        try:
            return self._conn.recv()
        except EOFError:
            code = self._proc.wait(timeout=_EXIT_TIMEOUT_S)
            raise RuntimeError(f"the engine process exited while starting (exit code {code}); "
                               "its error is in this process's stderr") from None

    def _read(self) -> None:
        """Hand each message of the core to the caller until the core's end."""
        try:
            while True:
                self._on_outputs(self._conn.recv())
        except (EOFError, OSError):
            pass
        code = self._proc.wait()
        clean = self._closing and code == 0
        self._on_exit(None if clean else f"the engine process exited (exit code {code})")

    def send(self, msg: object) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def close(self) -> None:
        """Shut the core down and wait for its process; kill it if it does not exit."""
        if self._closing:
            return
        self._closing = True
        try:
            self.send(Shutdown())
        except OSError:
            pass   # it is gone already
        try:
            self._proc.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=_EXIT_TIMEOUT_S)
