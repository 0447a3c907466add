"""The engine core in a process of its own (the default): its errors are the caller's,
and it never outlives the engine or the process that made it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine import Engine, ModelInput, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int, timeout: float = 60.0) -> bool:
    """Whether process `pid` has exited (and been reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/stat")
        if status.exists() and status.read_text().split()[2] == "Z":
            return True                       # a zombie: exited, waiting for its parent
        time.sleep(0.1)
    return False


def test_an_error_while_the_core_starts_is_raised_in_the_caller(tiny_model_dirs):
    with pytest.raises(ValueError, match="no memory is left for the KV cache"):
        Engine(tiny_model_dirs["llama-gqa-untied"], core="process", kv_cache_memory=1,
               progress=False)


def test_a_dead_core_fails_open_requests_and_shutdown_leaves_no_process(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], core="process", block_size=4,
                 num_kv_blocks=64, progress=False)
    pid = eng._core._proc.pid
    [stream] = eng.add_request([5, 6, 7], SamplingParams(max_tokens=200, stop=[]))
    stream.get(timeout=60)                                  # generation is under way
    os.kill(pid, signal.SIGKILL)
    outs = list(stream)
    assert outs[-1].finish_reason == "error" and "exited" in outs[-1].error
    assert not eng.is_alive()
    with pytest.raises(RuntimeError, match="not running"):
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    eng.shutdown()
    assert gone(pid)


def test_shutdown_ends_the_core_process(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], core="process", block_size=4,
                 num_kv_blocks=64, progress=False)
    resp = eng.sampling_client().sample(ModelInput.from_ints([5, 6]), 2,
                                        SamplingParams(max_tokens=3, stop=[])).result(timeout=60)
    assert [len(s.tokens) for s in resp.sequences] == [3, 3]
    pid = eng._core._proc.pid
    eng.shutdown()
    assert eng._core._proc.returncode == 0 and gone(pid)


def test_the_core_exits_when_the_process_that_made_it_dies(tiny_model_dirs):
    script = textwrap.dedent(f"""
        import os
        from engine import Engine
        eng = Engine({str(tiny_model_dirs["llama-gqa-untied"])!r}, core="process",
                     num_kv_blocks=16, progress=False)
        print(eng._core._proc.pid, flush=True)
        os._exit(0)                      # no shutdown, no atexit: as if it was killed
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert gone(int(out.stdout.split()[-1]))
