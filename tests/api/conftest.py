"""One real `pokeserve serve` process for the whole API test session.

It runs the default model on a free loopback port with an API key and an (initially
empty) checkpoint root; tests talk to it through the official `openai` SDK, or plain
HTTP where the SDK cannot express the request (bad JSON, missing key, /metrics).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests

from engine.outputs import RequestOutput, RequestStream

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300


@dataclass
class Server:
    url: str
    checkpoint_root: Path
    log_path: Path
    proc: subprocess.Popen

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def post(self, path: str, key: str | None = API_KEY, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}{path}", headers=headers, timeout=120, **kwargs)

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        assert values, f"{name} not in /metrics"
        return float(values[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, tmp: Path, *options: str) -> Iterator[Server]:
    """A `pokeserve serve` process on a free port with an empty checkpoint root under
    `tmp`, plus any further command-line `options`; stopped on exit."""
    root = tmp / "checkpoints"
    root.mkdir()
    port = _free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--api-key", API_KEY,
           "--checkpoint-root", str(root), "--model", str(model_dir),
           "--num-kv-blocks", "256", "--max-model-len", "2048", "--device", "cpu", *options]
    env = {**os.environ, "POKESERVE_API_KEY": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", root, log_path, proc)
    try:
        _wait_healthy(srv, proc)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(default_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(default_model_dir, tmp_path_factory.mktemp("api-server")) as srv:
        yield srv


def _wait_healthy(srv: Server, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{srv.log_path.read_text()}")
        try:
            if requests.get(f"{srv.url}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy in {STARTUP_TIMEOUT_S}s:\n{srv.log_path.read_text()}")


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


class OneOutputEngine:
    """An engine stand-in whose one request has already produced its one output."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out

    def add_request(self, prompt_ids, params, *, num_samples, request_id, **_) -> list:
        stream = RequestStream(self.out.request_id)
        stream.put(self.out)
        return [stream]

    def abort(self, sample_id: str) -> None:
        pass
