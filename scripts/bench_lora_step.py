"""Where a mixed decode step's time goes: the LoRA products against the base model's work.

`--requests` concurrent requests (a 32-token prompt, `--max-tokens` new tokens, EOS
ignored) through an in-process engine over the default model (its loop on the main
thread), request i for checkpoint i mod k, for each k of `--counts`; k = 1 runs merged,
larger k unmerged with the adapters in slots. Adapters are bench_checkpoints' (rank 32
on every attention and MLP projection). For the decode steps (one token per sequence),
prints the mean time of the model's forward pass and, within it, the time in the LoRA
products (`LoraSlots.add`: the shrink, the expand and the glue around them); the rest is
the base model's work.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_lora_step.py [--dtype bfloat16]
        [--counts 1 4 16] [--requests 16] [--max-tokens 48] [--device cuda] [--model DIR]

On CUDA every timed span is synchronised first and last (the LoRA products run the Triton
kernels there, so `shrink` and `expand`, the reference's, read 0). `--model`: another
directory of the default model's shape (scripts/random_model.py makes one where the
embedded model cannot be fetched).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import with_loop_on_main_thread  # noqa: E402
from bench_evals import machine, make_checkpoints  # noqa: E402
from bench_sampling import device_name  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.layers.lora import LoraSlots  # noqa: E402
from engine.models.default_model import fetch_default_model  # noqa: E402
from kernels import lora_ref  # noqa: E402


class Timers:
    """Seconds spent in each timed function since the last `take` (`sync` before each
    reading of the clock: CUDA's work is asynchronous)."""

    def __init__(self, sync=lambda: None) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.sync = sync

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                self.spent[label] += time.perf_counter() - start
        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


def time_decode_forwards(model: torch.nn.Module, timers: Timers) -> list[dict[str, float]]:
    """Hooks on the model: one record per decode-only forward pass (seconds by label)."""
    records, started = [], {}

    def before(module, args):
        timers.sync()
        timers.take()
        started["at"] = time.perf_counter()

    def after(module, args, output):
        meta = args[3]
        timers.sync()
        spent = timers.take()
        if meta.num_decodes == len(meta.query_lens):
            records.append({**spent, "forward": time.perf_counter() - started["at"]})
    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    return records


def run(engine: Engine, names: list[str], args) -> None:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=[],
                            ignore_eos=True)
    infos = [engine.checkpoints.resolve(name) for name in names]
    streams = [engine.add_request(list(range(100 + i, 132 + i)), params,
                                  checkpoint=infos[i % len(infos)])[0]
               for i in range(args.requests)]
    for stream in streams:
        outputs = list(stream)
        assert outputs[-1].finish_reason == "length", outputs[-1].error


def measure(engine: Engine, names: list[str], records: list[dict[str, float]],
            args) -> dict[int, dict[str, float]]:
    """Mean ms per decode forward pass, by label, for each count of checkpoints."""
    run(engine, names, argparse.Namespace(**{**vars(args), "requests": len(names),
                                             "max_tokens": 2}))   # warm-up
    results = {}
    for k in tqdm(args.counts, desc="checkpoints"):
        records.clear()
        run(engine, names[:k], args)
        results[k] = {label: 1000 * statistics.mean(r.get(label, 0.0) for r in records)
                      for label in ("forward", "lora", "shrink", "expand")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    timers = Timers(torch.cuda.synchronize if cuda else lambda: None)
    timers.wrap(lora_ref, "shrink", "shrink")       # before the engine picks its LoRA ops
    timers.wrap(lora_ref, "expand", "expand")
    timers.wrap(LoraSlots, "add", "lora")
    model_dir = Path(args.model) if args.model else fetch_default_model()
    where = device_name(torch.device(args.device)) if cuda else machine()
    print(f"machine: {where}; model {model_dir.name}, {args.dtype}, LoRA rank {args.rank}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_checkpoints(model_dir, root, max(args.counts), args.rank)
        # The loop on this main thread, as the server's core runs it (in a background
        # thread the small products are several times slower: BENCHMARKS.md).
        engine = Engine(model_dir, core="inline", dtype=getattr(torch, args.dtype),
                        device=args.device,
                        checkpoint_root=str(root), max_loras=max(args.counts),
                        enable_prefix_caching=False, progress=False)
        records = time_decode_forwards(engine.core.runner.model, timers)
        results = with_loop_on_main_thread(engine, lambda: measure(engine, names, records, args))
    print(f"decode steps of {args.requests} sequences, mean ms per forward pass:")
    print(f"  {'checkpoints':>11s} {'forward':>8s} {'LoRA':>7s} {'shrink':>7s} {'expand':>7s} "
          f"{'base':>7s} {'vs 1':>6s}")
    first = results[args.counts[0]]["forward"]
    for k, r in results.items():
        print(f"  {k:11d} {r['forward']:8.2f} {r['lora']:7.2f} {r['shrink']:7.2f} "
              f"{r['expand']:7.2f} {r['forward'] - r['lora']:7.2f} {first / r['forward']:5.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
