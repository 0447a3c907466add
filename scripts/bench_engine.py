"""Engine throughput against transformers' `generate`, the way a server is used.

64 prompts of mixed lengths, each with its own max_tokens in [8, 200] (EOS ignored), all
submitted to the engine at once; the same requests through `generate` in padded batches
of 32 (each batch runs to its longest request, as a user batches with it). Also batch-1
decode speed. Same command, same machine, for each dtype asked.

The engine loop runs on the main thread and the clients on another, as in `pokeserve
serve`; `--background-loop` measures the native client's default instead (the loop in a
thread of its own, slower on the CPU: see engine/llm_engine.py).

    .venv/bin/python scripts/bench_engine.py [--dtypes float32 bfloat16] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import platform
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from engine import Engine, ModelInput, SamplingParams
from engine.models.default_model import fetch_default_model

T = TypeVar("T")


def make_requests(n: int, vocab: int, max_len: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs; a model of short context (`max_len`) gets shorter ones."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        prompt = [rng.randrange(min(100, vocab // 2), vocab)
                  for _ in range(rng.randint(16, min(256, max_len // 2)))]
        requests.append((prompt, rng.randint(8, min(200, max_len - len(prompt)))))
    return requests


def bench_engine(engine: Engine, requests) -> float:
    """Useful tokens per second with every request submitted at once."""
    client = engine.sampling_client()
    start = time.perf_counter()
    futures = [client.sample(ModelInput.from_ints(p), 1, SamplingParams(
        max_tokens=m, temperature=0.0, stop=[])) for p, m in requests]
    useful = sum(len(f.result().sequences[0].tokens) for f in futures)
    return useful / (time.perf_counter() - start)


def bench_generate(model, requests, batch_size: int, pad_id: int) -> float:
    """Useful tokens per second with padded (left) batches run to their longest request."""
    start, useful = time.perf_counter(), 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(m for _, m in batch)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
        useful += sum(m for _, m in batch)
    return useful / (time.perf_counter() - start)


def measure_engine(engine: Engine, requests, single) -> dict[str, float]:
    bench_engine(engine, requests[:4])                 # warm-up
    return {"mixed": bench_engine(engine, requests), "batch-1": bench_engine(engine, [single])}


def with_loop_on_main_thread(engine: Engine, clients: Callable[[], T]) -> T:
    """`clients()` on another thread while the engine loop runs on this one, as `pokeserve
    serve` runs them; the engine is shut down after."""
    results: list[T] = []

    def client_thread() -> None:
        try:
            results.append(clients())
        finally:
            engine.shutdown()

    threading.Thread(target=client_thread).start()
    engine.run()
    if not results:
        raise SystemExit("the client thread failed (see above)")
    return results[0]


def run(dtype_name: str, num_prompts: int, model_dir, background_loop: bool) -> None:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    engine = Engine(model_dir, dtype=dtype, progress=False, start=background_loop)
    requests = make_requests(num_prompts, engine.model_config.vocab_size, engine.max_model_len)
    prompt = requests[0][0]
    single = (prompt, min(128, engine.max_model_len - len(prompt)))     # the batch-1 decode
    if background_loop:
        ours = measure_engine(engine, requests, single)
        engine.shutdown()
    else:
        ours = with_loop_on_main_thread(engine, lambda: measure_engine(engine, requests, single))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    theirs = {"mixed": bench_generate(hf, requests, 32, 2),
              "batch-1": bench_generate(hf, [single], 1, 2)}
    for name in ours:
        print(f"{dtype_name:9s} {name:8s} pokeserve {ours[name]:8.1f} tok/s   transformers "
              f"{theirs[name]:8.1f} tok/s   ratio {ours[name] / theirs[name]:5.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--model", default=None, help="model directory (default: embedded model)")
    parser.add_argument("--background-loop", action="store_true",
                        help="run the engine loop in its own thread (the native client's default)")
    args = parser.parse_args()
    model_dir = args.model or fetch_default_model()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {model_dir}; engine loop "
          f"{'in a background thread' if args.background_loop else 'on the main thread'}")
    for dtype_name in args.dtypes:
        run(dtype_name, args.num_prompts, model_dir, args.background_loop)


if __name__ == "__main__":
    main()
