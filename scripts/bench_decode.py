"""Decode steps of a Llama-3.1-8B-shaped random model, against the time to read its weights.

The model is built from `--shape`'s config with random bfloat16 weights (nothing to
download: the figure is the engine's, not a checkpoint's), and for each `--batches` size
one decode step (one new token per sequence, each at position `--context` - 1 of its own
paged KV blocks, filled at random) is timed: the model's forward and its logits, median
over `--iters` steps after two warm-up ones, synchronised on CUDA. The baseline in the
same command is the floor of a decode step, reading every weight once at the memory
bandwidth this device shows (a sum over a buffer as large as the weights).

    python scripts/bench_decode.py [--device cuda] [--shape llama-3.1-8b] [--batches 1 64]
        [--context 1024] [--iters 20]

`--shape tiny` is the same on a model small enough for a CPU (a smoke run of the script).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_hybrid_decode import decode_inputs  # noqa: E402
from bench_sampling import device_name  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.models.llama import LlamaForCausalLM  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=8192),
}


@torch.no_grad()
def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model of `shape`, random weights straight on `device` (no host copy)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_dict(SHAPES[shape]))
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.rotary.reset_cache()
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_seconds(nbytes: int, device: torch.device, dtype: torch.dtype) -> float:
    """Best of five sums over a buffer of `nbytes`: the floor of reading that much once."""
    buffer = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum(dtype=torch.float32)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def step_seconds(model: LlamaForCausalLM, inputs: tuple, iters: int,
                 device: torch.device) -> float:
    """Median seconds of one decode step: the forward pass and every sequence's logits."""
    times = []
    for i in range(iters + 2):
        synchronize(device)
        start = time.perf_counter()
        model.compute_logits(model(*inputs), None)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    model = build(args.shape, device, dtype)
    weights = sum(p.nbytes for p in model.parameters())
    floor = read_seconds(weights, device, dtype)
    print(f"device: {device_name(device)}; {args.shape}, bfloat16, {weights / 1e9:.2f} GB of "
          f"weights, read once in {floor * 1e3:.2f} ms ({weights / floor / 1e9:.0f} GB/s); "
          f"context {args.context}, torch {torch.__version__}")
    print("| batch | ms a step | tokens/s | vs reading the weights once |\n|---|---|---|---|")
    for batch in args.batches:
        inputs = decode_inputs(model, batch, args.context, dtype, device)
        seconds = step_seconds(model, inputs, args.iters, device)
        print(f"| {batch} | {seconds * 1e3:.2f} | {batch / seconds:.0f} | "
              f"{seconds / floor:.2f}x |", flush=True)
        del inputs


if __name__ == "__main__":
    main()
