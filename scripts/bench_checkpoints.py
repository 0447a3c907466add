"""How fast a sampler checkpoint is served: one never seen before, one cached, and the switch.

Adapters of the training service's default shape (rank 32, alpha 32, every attention
and MLP projection) over the default model, written by PEFT into a checkpoint root.
Time to first token of one prompt (max_tokens=1, prefix cache off so that every
request prefills) through the engine, and within it the time the engine thread spent
switching (`LoraManager.activate`), for a request to:
- the base model while it is active: the baseline, no switch;
- a checkpoint never seen before: resolved, read from disk, checked, merged;
- a checkpoint whose adapter is cached: the switch is a merge only;
- the base model after a checkpoint: the switch is a restore.

    .venv/bin/python scripts/bench_checkpoints.py [--rank 32] [--repeats 5] [--prompt-len 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams
from engine.checkpoints.merge import LoraManager
from engine.models.default_model import fetch_default_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUN = "bench:train:0"


def make_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters with random factors, saved as complete sampler checkpoints."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    dirs = []
    for i in tqdm(range(count), desc="writing adapters"):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        out = root / RUN / "sampler_weights" / f"{i:06d}"
        model.save_pretrained(out, save_embedding_layers=False)
        (out / "checkpoint_complete").touch()
        dirs.append(out)
    return dirs


def ttft(engine: Engine, prompt: list[int], checkpoint: str | None) -> float:
    start = time.perf_counter()
    info = engine.checkpoints.resolve(checkpoint) if checkpoint else None
    [stream] = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, stop=[]),
                                  checkpoint=info)
    outputs = list(stream)
    assert outputs[-1].finish_reason == "length", outputs[-1].error
    return time.perf_counter() - start


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


class SwitchTimer:
    """Wraps the engine's `LoraManager.activate` to time the calls that switch checkpoints
    (on the engine thread, where the engine does them)."""

    def __init__(self, manager: LoraManager) -> None:
        self.manager, self.activate = manager, manager.activate
        self.last = 0.0
        manager.activate = self

    def __call__(self, checkpoint_dir: Path | None) -> None:
        switching = checkpoint_dir != self.manager.active
        start = time.perf_counter()
        self.activate(checkpoint_dir)
        if switching:
            self.last = time.perf_counter() - start


def bench(model_dir: Path, root: Path, names: list[str], prompt: list[int], repeats: int) -> dict:
    """label -> (TTFTs, switch times) in seconds."""
    # In-process core: the timer wraps its LoRA manager.
    engine = Engine(model_dir, core="thread", checkpoint_root=str(root),
                    enable_prefix_caching=False, progress=False)
    timer = SwitchTimer(engine.core.lora.merger)
    results: dict[str, tuple[list[float], list[float]]] = {}

    def measure(label: str, checkpoint: str | None) -> None:
        timer.last = 0.0
        ttfts, switches = results.setdefault(label, ([], []))
        ttfts.append(ttft(engine, prompt, checkpoint))
        switches.append(timer.last)

    try:
        for _ in range(2):
            ttft(engine, prompt, None)   # warm-up
        for _ in range(repeats):
            measure("base model (no switch)", None)
        for name in names[2:]:
            measure("new checkpoint (read + merge)", name)   # each never seen before
        for name in names[:2]:
            ttft(engine, prompt, name)
        for i in range(repeats):
            measure("cached checkpoint (merge)", names[i % 2])
            measure("back to base (restore)", None)
    finally:
        engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: embedded model)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 avoids thread wake-up stalls on a busy CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model or fetch_default_model())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}; model {model_dir.name}, float32, LoRA rank {args.rank}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_adapters(model_dir, root, args.repeats + 2, args.rank)
        size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        print(f"adapter: {size / 2**20:.1f} MiB on disk")
        names = [f"tinker://{RUN}/sampler_weights/{d.name}" for d in dirs]
        prompt = list(range(100, 100 + args.prompt_len))
        results = bench(model_dir, root, names, prompt, args.repeats)
    baseline = median_ms(results["base model (no switch)"][0])
    print(f"medians over {args.repeats} requests, {args.prompt_len}-token prompt:")
    print(f"  {'request for':30s} {'first token':>11s} {'vs base':>8s} {'of which switch':>16s}")
    for label, (ttfts, switches) in results.items():
        print(f"  {label:30s} {median_ms(ttfts):8.1f} ms {median_ms(ttfts) / baseline:7.2f}x "
              f"{median_ms(switches):13.1f} ms")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
