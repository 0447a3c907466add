"""One MoE layer alone at Qwen3-30B-A3B's shape, against transformers and the memory floor.

Hidden 2048, 128 experts of width 768, top 8 renormalised; random bfloat16 weights (about
1.2 GB), shared by both sides. For 1, 8 and 64 tokens, in the same command:
- pokeserve's `SparseMoE` (engine/layers/moe.py);
- transformers' own `Qwen3MoeSparseMoeBlock`, with its default experts implementation
  (`grouped_mm`) and with `eager` (a loop over the experts hit, like ours);
- the floor: the time to read, once, the weights of the experts the tokens hit, at the
  memory bandwidth this machine shows in the same run (a read of a buffer 4x larger than
  the caches, repeated, best run).
Each candidate is timed in turn, round after round, so that a change of load on a shared
machine falls on all of them alike; the figure is the median over rounds.

    .venv/bin/python scripts/bench_moe.py [--tokens 1 8 64] [--rounds 30] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from tqdm import tqdm

from engine.layers.moe import SparseMoE, softmax_topk

HIDDEN, EXPERTS, WIDTH, TOP_K = 2048, 128, 768, 8


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read by a reduction over a buffer far larger than the caches."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def build_layers() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    ours = SparseMoE(HIDDEN, EXPERTS, WIDTH, partial(softmax_topk, top_k=TOP_K, renormalize=True))
    ours = ours.to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    layers = {"pokeserve": ours}
    for impl in ("grouped_mm", "eager"):
        cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=EXPERTS,
                             num_experts_per_tok=TOP_K, norm_topk_prob=True)
        cfg._experts_implementation = impl
        with torch.device("meta"):
            theirs = Qwen3MoeSparseMoeBlock(cfg)
        theirs.load_state_dict(ours.state_dict(), assign=True)    # the same tensors, no copy
        layers[f"transformers {impl}"] = lambda x, m=theirs: m(x[None])[0]
    return layers


def experts_hit_bytes(moe: SparseMoE, x: torch.Tensor) -> int:
    _, experts = moe.router(moe.gate(x))
    per_expert = (moe.experts.gate_up_proj[0].nbytes + moe.experts.down_proj[0].nbytes)
    return len(experts.unique()) * per_expert + moe.gate.weight.nbytes


@torch.inference_mode()
def bench(layers: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each layer on x, timed in turn round after round."""
    reference = layers["pokeserve"](x)
    for name, layer in layers.items():   # warm-up, and a check that all compute the same
        torch.testing.assert_close(layer(x), reference, atol=2e-2, rtol=2e-2, msg=name)
    return time_in_turn(layers, x, rounds)


def time_in_turn(layers: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each layer on x, each timed in turn, round after round
    (a change of load on a shared machine falls on all alike); synchronised on CUDA."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in tqdm(range(rounds), desc=f"{len(x)} tokens", leave=False):
        for name, layer in layers.items():
            sync()
            start = time.perf_counter()
            layer(x)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    layers = build_layers()
    bandwidth = memory_bandwidth()
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    names = list(layers)
    print(f"{'tokens':>6} {'hit MB':>7} {'floor ms':>8} "
          + " ".join(f"{n + ' ms':>24}" for n in names)
          + f" {'vs ' + names[1]:>16} {'vs ' + names[2]:>12} {'vs floor':>8}")
    for n in args.tokens:
        x = torch.randn(n, HIDDEN, dtype=torch.bfloat16)
        floor = experts_hit_bytes(layers["pokeserve"], x) / bandwidth
        t = bench(layers, x, args.rounds)
        print(f"{n:>6} {floor * bandwidth / 1e6:>7.0f} {floor * 1e3:>8.2f} "
              + " ".join(f"{t[name] * 1e3:>24.2f}" for name in names)
              + f" {t[names[1]] / t['pokeserve']:>15.2f}x {t[names[2]] / t['pokeserve']:>11.2f}x"
              + f" {t['pokeserve'] / floor:>7.2f}x", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
