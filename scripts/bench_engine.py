"""Engine throughput against transformers' `generate`, the way a server is used.

64 prompts of mixed lengths, each with its own max_tokens in [8, 200] (EOS ignored), all
submitted to the engine at once; the same requests through `generate` in padded batches
of 32 (each batch runs to its longest request, as a user batches with it). Also batch-1
decode speed. Same command, same machine, for each dtype asked.

The engine runs in each mode of `--cores`: `process` (the default, its core in a
process of its own), `inline` (its loop on this process's main thread, the clients on
another: the fastest in-process mode, see engine/core_client.py) and `thread` (the loop in
a background thread). Then `n` samples of one long prompt against one sample: the
prompt's one prefill is shared (engine stats count the prompt tokens computed).

With `--batch-invariant` each core mode is measured twice, as it is and with the
batch-invariant mode on (`inline+invariant`, ...), in turns within each round.

    .venv/bin/python scripts/bench_engine.py [--dtypes float32 bfloat16] [--num-prompts 64]
        [--cores process inline] [--repeats 1] [--batch-invariant] [--model DIR]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from engine import Engine, ModelInput, SamplingParams
from engine.models.default_model import fetch_default_model
from engine.models.registry import load_model_config

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
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch],
                           device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch],
                            device=model.device)
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
    """`clients()` on another thread while an inline engine's loop runs on this one; the
    engine is shut down after."""
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


def measure_mode(mode: str, model_dir, dtype: torch.dtype, requests, single,
                 device: str = "cpu") -> dict[str, float]:
    """mode: a core mode, `+invariant` for the batch-invariant mode."""
    rates = _measure_new_engine(mode, model_dir, dtype, requests, single, device)
    gc.collect()      # an engine and its core refer to each other: free its KV cache now
    return rates


def _measure_new_engine(mode: str, model_dir, dtype: torch.dtype, requests, single,
                        device: str) -> dict[str, float]:
    core, _, numerics = mode.partition("+")
    engine = Engine(model_dir, core=core, dtype=dtype, progress=False, device=device,
                    batch_invariant=numerics == "invariant")
    if core == "inline":
        return with_loop_on_main_thread(engine, lambda: measure_engine(engine, requests, single))
    try:
        return measure_engine(engine, requests, single)
    finally:
        engine.shutdown()


def measure_samples(model_dir, dtype: torch.dtype, n: int, prompt_len: int,
                    device: str = "cpu") -> None:
    """`n` samples of one prompt against one, max_tokens 1, with the default engine; no
    prefix caching, so that nothing but the shared prefill can save the prompt's work."""
    engine = Engine(model_dir, dtype=dtype, enable_prefix_caching=False, progress=False,
                    device=device)
    rng = random.Random(1)
    prompt = ModelInput.from_ints([rng.randrange(100, engine.model_config.vocab_size)
                                   for _ in range(prompt_len)])
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0, stop=[])
    client = engine.sampling_client()
    seconds, computed = {}, {}
    for count in (1, n, 1, n):                          # the first two warm up
        before, start = engine.stats().num_computed_prompt_tokens, time.perf_counter()
        client.sample(prompt, count, params).result()
        seconds[count] = time.perf_counter() - start
        computed[count] = engine.stats().num_computed_prompt_tokens - before
    engine.shutdown()
    print(f"  {n} samples of a {prompt_len}-token prompt: {seconds[n]:.3f} s vs 1 sample "
          f"{seconds[1]:.3f} s, ratio {seconds[n] / seconds[1]:.2f}x; prompt tokens computed "
          f"{computed[n]} vs {computed[1]}", flush=True)


def best_of(repeats: int, cores: list[str], measure: Callable[[str], dict[str, float]]
            ) -> dict[str, dict[str, float]]:
    """Each mode's best rate per workload over `repeats` rounds, the modes taking turns
    within a round, so that a shared machine's load falls on all of them alike."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for core in cores:
            for name, rate in measure(core).items():
                best.setdefault(core, {})[name] = max(rate, best.get(core, {}).get(name, 0.0))
    return best


def run(dtype_name: str, num_prompts: int, model_dir, modes: list[str], repeats: int,
        device: str = "cpu") -> None:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    cfg = load_model_config(model_dir)
    max_len = cfg.max_position_embeddings
    requests = make_requests(num_prompts, cfg.vocab_size, max_len)
    prompt = requests[0][0]
    single = (prompt, min(128, max_len - len(prompt)))     # the batch-1 decode
    ours = best_of(repeats, modes,
                   lambda core: measure_mode(core, model_dir, dtype, requests, single, device))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    theirs = {"mixed": bench_generate(hf, requests, 32, 2),
              "batch-1": bench_generate(hf, [single], 1, 2)}
    del hf
    for mode, rates in ours.items():
        for name, rate in rates.items():
            print(f"{dtype_name:9s} {mode:16s} {name:8s} pokeserve {rate:8.1f} tok/s   "
                  f"transformers {theirs[name]:8.1f} tok/s   ratio {rate / theirs[name]:5.2f}x"
                  + "".join(f"   {rate / ours[other][name]:5.2f}x of {other}"
                            for other in ours if other != mode), flush=True)
    measure_samples(model_dir, dtype, 16, min(1000, max_len - 1), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--model", default=None, help="model directory (default: embedded model)")
    parser.add_argument("--cores", nargs="+", default=["process", "inline"],
                        choices=["process", "inline", "thread"],
                        help="where the engine core runs: each mode is measured")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the modes in turn; each mode's best round is shown")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="measure each core mode with the batch-invariant mode on too")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    modes = [m for core in args.cores
             for m in ([core, f"{core}+invariant"] if args.batch_invariant else [core])]
    model_dir = args.model or fetch_default_model()
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {where}, torch {torch.__version__}; model {model_dir}")
    for dtype_name in args.dtypes:
        run(dtype_name, args.num_prompts, model_dir, modes, args.repeats, args.device)


if __name__ == "__main__":
    main()
