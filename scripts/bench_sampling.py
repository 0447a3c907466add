"""Benchmark the fused Triton sampler against the sort-based PyTorch reference.

    .venv/bin/python scripts/bench_sampling.py [--iters N]

Batches 1, 32 and 256 at vocabularies 32k and 152k, each row with its own mix of
temperature, top-k, top-p and min-p (greedy rows included). On CUDA it times both
paths in this process and prints the ratio (goal: Triton at least 3x faster than the
reference at batch 256, vocabulary 152k). Without a GPU it says so and times the
reference alone. Times are medians over --iters calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial
from typing import Callable

import torch
from tqdm import tqdm

from kernels import sampling_ref

BATCHES = (1, 32, 256)
VOCABS = (32_000, 151_936)          # Llama-2 / Mistral and Qwen2 vocabularies
# (temperature, top_k, top_p, min_p) cycled over the rows of a batch.
ROW_MIXES = ((0.7, 0, 0.9, 0.0), (1.0, 50, 1.0, 0.0), (0.8, 40, 0.95, 0.05), (0.0, 0, 1.0, 0.0))


def make_batch(batch: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * vocab)
    mixes = [ROW_MIXES[row % len(ROW_MIXES)] for row in range(batch)]
    columns = list(zip(*mixes))
    args = {
        "logits": torch.randn(batch, vocab, generator=gen) * 3.0,
        "temperature": torch.tensor(columns[0], dtype=torch.float32),
        "top_k": torch.tensor(columns[1], dtype=torch.int32),
        "top_p": torch.tensor(columns[2], dtype=torch.float32),
        "min_p": torch.tensor(columns[3], dtype=torch.float32),
        "seeds": torch.arange(batch, dtype=torch.int64),
        "steps": torch.zeros(batch, dtype=torch.int64),
    }
    return {name: t.to(device) for name, t in args.items()}


def median_seconds(fn: Callable[[], torch.Tensor], iters: int, device: torch.device) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()                                                  # warm-up (and Triton compile)
    return statistics.median(timed() for _ in range(iters))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls per shape (default: 50 on CUDA, 3 on CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    iters = args.iters or (50 if cuda else 3)
    print(f"device: {device_name(device)}; torch {torch.__version__}; median of {iters} calls")
    if cuda:
        from kernels import sampling
        print(f"{'batch':>5} {'vocab':>7} {'reference ms':>13} {'triton ms':>10} {'speedup':>8}")
    else:
        print("no CUDA GPU: timing the PyTorch reference alone (the Triton path needs a GPU)")
        print(f"{'batch':>5} {'vocab':>7} {'reference ms':>13}")
    shapes = [(batch, vocab) for vocab in VOCABS for batch in BATCHES]
    for batch, vocab in tqdm(shapes, desc="shapes", leave=False):
        inputs = make_batch(batch, vocab, device)
        ref_ms = 1e3 * median_seconds(partial(sampling_ref.sample, **inputs), iters, device)
        row = f"{batch:>5} {vocab:>7} {ref_ms:>13.3f}"
        if cuda:
            triton_ms = 1e3 * median_seconds(partial(sampling.sample, **inputs), iters, device)
            row += f" {triton_ms:>10.3f} {ref_ms / triton_ms:>7.2f}x"
        tqdm.write(row)
        del inputs   # this batch's tensors, before the next is made


if __name__ == "__main__":
    main()
