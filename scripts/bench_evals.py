"""An eval over many checkpoints at once: the same chat requests spread over 1, 4 and 16.

An eval harness sends 64 chat requests (64 tokens each, EOS ignored) from 16 concurrent
clients to `pokeserve serve`; request i asks checkpoint i mod k. With k = 1 every step
serves one merged checkpoint; with k = 4 or 16 steps mix checkpoints, the base weights
unmerged and each row adding its own adapter. Measured in one server process, in
`--rounds` rounds of every k in turn; prints each k's tokens/s per round, and the ratio
to k = 1 of the best round of each (on a shared machine the best is the least disturbed;
the ratio of medians follows it). Adapters are of the training service's default shape (rank 32, alpha 32, every
attention and MLP projection), random, written by PEFT; each checkpoint answers one
request before the timing, so that reading adapters from disk is not counted.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_evals.py [--dtype bfloat16]
        [--lora-mode auto] [--counts 1 4 16] [--requests 64] [--clients 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_checkpoints import RUN, make_adapters  # noqa: E402
from bench_serve import free_port, serve  # noqa: E402

from engine.config import LORA_MODES  # noqa: E402
from engine.models.default_model import fetch_default_model  # noqa: E402


def machine() -> str:
    """The CPU, its cores, the OpenMP threads and the load: the conditions of a figure."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")


def make_checkpoints(model_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    """bench_checkpoints' random adapters under `root`, by the names requests give them."""
    return [f"tinker://{RUN}/sampler_weights/{d.name}"
            for d in make_adapters(model_dir, root, count, rank)]


def chat(url: str, model: str, question: str, max_tokens: int) -> int:
    """One chat completion; its completion tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    resp = requests.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
    resp.raise_for_status()
    return resp.json()["usage"]["completion_tokens"]


def eval_run(url: str, models: list[str], args, progress: str) -> float:
    """Tokens per second of the request set, request i for models[i % len(models)]."""
    jobs = [(models[i % len(models)], f"Question {i}: what is {i} + {3 * i}? Explain why.")
            for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        tokens = list(tqdm(pool.map(lambda job: chat(url, *job, args.max_tokens), jobs),
                           total=len(jobs), desc=progress, leave=False))
    return sum(tokens) / (time.perf_counter() - start)


def start_server(args, model_dir: Path, root: Path, port: int) -> subprocess.Popen:
    return serve(port, "--device", "cpu", "--dtype", args.dtype, "--model", str(model_dir),
                 "--checkpoint-root", str(root), "--max-loras", str(max(args.counts)),
                 "--lora-mode", args.lora_mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--lora-mode", default="auto", choices=LORA_MODES,
                        help="merged: one checkpoint per step, in turns (the old behaviour)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_dir = fetch_default_model()
    print(f"machine: {machine()}; model {model_dir.name}, {args.dtype}, "
          f"lora_mode {args.lora_mode}, LoRA rank {args.rank}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_checkpoints(model_dir, root, max(args.counts), args.rank)
        port = free_port()
        server = start_server(args, model_dir, root, port)
        url = f"http://127.0.0.1:{port}"
        try:
            for name in tqdm(names, desc="warm-up", leave=False):
                chat(url, name, "Hello!", 4)
            rates: dict[int, list[float]] = {k: [] for k in args.counts}
            for round_ in range(args.rounds):
                for k in args.counts:
                    rates[k].append(eval_run(url, names[:k], args,
                                             f"round {round_ + 1}: {k} checkpoints"))
                    tqdm.write(f"round {round_ + 1}: {k:3d} checkpoints {rates[k][-1]:7.1f} tok/s "
                               f"(load average {os.getloadavg()[0]:.1f})")
        finally:
            server.terminate()
            server.wait(timeout=60)
    best = {k: max(runs) for k, runs in rates.items()}
    median = {k: statistics.median(runs) for k, runs in rates.items()}
    first = args.counts[0]
    print(f"{args.requests} chat requests x {args.max_tokens} tokens, {args.clients} clients, "
          f"tok/s in each of {args.rounds} rounds; ratios to {first} checkpoint(s):")
    for k, runs in rates.items():
        shown = " / ".join(f"{r:6.1f}" for r in runs)
        print(f"  {k:3d} checkpoints  {shown}   best {best[k] / best[first]:4.2f}x   "
              f"median {median[k] / median[first]:4.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
