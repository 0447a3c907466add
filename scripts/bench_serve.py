"""HTTP serving throughput against the engine's own, on the same requests, same command.

The 32-request set of bench_engine.py (random prompts of 16-256 tokens, max_tokens in
[8, 200], EOS ignored) runs twice: first offline, all submitted at once to an in-process
engine whose loop runs on the main thread, as the server's does; then through `pokeserve
serve` in its own process, every request a concurrent streaming /v1/completions client.
Prints aggregate useful tokens/s of each, the HTTP run's time to first token (p50/p95),
and the ratio HTTP / offline; with `--repeats` the two take turns for that many rounds
and each side's best round counts.

    .venv/bin/python scripts/bench_serve.py [--num-prompts 32] [--device cpu] [--dtype float32]
        [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import bench_engine, make_requests, with_loop_on_main_thread  # noqa: E402

from engine import Engine  # noqa: E402
from engine.models.default_model import fetch_default_model  # noqa: E402


def stream_one(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


def bench_http(url: str, model: str, reqs) -> tuple[float, list[float]]:
    """Useful tokens per second and each request's time to first token, all concurrent."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(reqs)) as pool:
        results = list(pool.map(lambda r: stream_one(url, model, *r), reqs))
    elapsed = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / elapsed, [ttft for ttft, _ in results]


def start_server(args, port: int) -> subprocess.Popen:
    return serve(port, "--device", args.device, "--dtype", args.dtype,
                 "--model", str(args.model_dir))


def serve(port: int, *flags: str) -> subprocess.Popen:
    """`pokeserve serve --port port *flags` in its own process, once it answers /health."""
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "POKESERVE_API_KEY": ""})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_offline(args) -> tuple[float, list[tuple[list[int], int]]]:
    """The requests, and their useful tokens/s through an inline engine whose loop runs on
    this main thread, as the server's does (the engine is shut down after)."""
    engine = Engine(args.model_dir, core="inline", device=args.device,
                    dtype=getattr(torch, args.dtype), progress=False)
    cfg = engine.model_config
    reqs = make_requests(args.num_prompts, cfg.vocab_size, cfg.max_position_embeddings)

    def clients() -> float:
        bench_engine(engine, reqs[:4])   # warm-up
        return bench_engine(engine, reqs)

    return with_loop_on_main_thread(engine, clients), reqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--model", dest="model_dir", default=None)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of both sides in turn, each side's best round shown: on a "
                             "shared machine one run of each cannot tell HTTP from drift")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.model_dir = Path(args.model_dir or fetch_default_model())
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"machine: {device_name}; {args.device} {args.dtype}; model {args.model_dir.name}")

    offline, served = [], []                 # per round; the two sides take turns
    for round_ in range(args.repeats):
        rate, reqs = bench_offline(args)
        offline.append(rate)
        served.append(bench_server(args, reqs))
        print(f"round {round_ + 1}: offline {offline[-1]:7.1f} tok/s, HTTP "
              f"{served[-1][0]:7.1f} tok/s (load average {os.getloadavg()[0]:.1f})", flush=True)
    best_offline, (best_served, ttfts) = max(offline), max(served, key=lambda r: r[0])
    p50, p95 = statistics.quantiles(ttfts, n=20)[9], statistics.quantiles(ttfts, n=20)[18]
    print(f"best of {args.repeats} round(s):")
    print(f"offline engine  {best_offline:8.1f} tok/s")
    print(f"HTTP streaming  {best_served:8.1f} tok/s   TTFT p50 {p50 * 1000:7.0f} ms   "
          f"p95 {p95 * 1000:7.0f} ms")
    print(f"ratio HTTP / offline {best_served / best_offline:5.2f} "
          f"(HTTP costs {1 - best_served / best_offline:6.1%})")


def bench_server(args, reqs) -> tuple[float, list[float]]:
    """`bench_http` against a fresh `pokeserve serve`, after a warm-up."""
    port = free_port()
    server = start_server(args, port)
    try:
        url = f"http://127.0.0.1:{port}"
        bench_http(url, args.model_dir.name, reqs[:4])   # warm-up
        return bench_http(url, args.model_dir.name, reqs)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
