"""How fast a sampler checkpoint is served: one never seen before, one cached, and the switch.

Adapters of the training service's default shape (rank 32, alpha 32, every attention
and MLP projection) over the default model, written by PEFT into a checkpoint root.
Time to first token of one prompt (max_tokens=1, prefix cache off so that every
request prefills) through the engine, for:
- the base model: the baseline, every ratio is against it;
- a checkpoint never seen before: resolved, read from disk, checked, merged;
- a checkpoint whose adapter is cached: the switch is a merge only.
Then the switch alone (`LoraManager.activate` on a second copy of the model): a new
adapter (read + merge), a cached one (merge), and back to the base (restore).

    .venv/bin/python scripts/bench_checkpoints.py [--rank 32] [--repeats 5] [--prompt-len 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams
from engine.config import ModelConfig
from engine.default_model import fetch_default_model
from engine.lora_manager import LoraManager
from engine.models.loader import load_model

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
    stream = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, stop=[]),
                                checkpoint=checkpoint)
    outputs = list(stream)
    assert outputs[-1].finish_reason == "length", outputs[-1].error
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_engine(model_dir: Path, root: Path, names: list[str], prompt: list[int], repeats: int) -> dict:
    engine = Engine(model_dir, checkpoint_root=str(root), enable_prefix_caching=False, progress=False)
    try:
        for _ in range(2):
            ttft(engine, prompt, None)   # warm-up
        base = [ttft(engine, prompt, None) for _ in range(repeats)]
        new = [ttft(engine, prompt, name) for name in names[2:]]   # each never seen before
        cached_pair = names[:2]
        for name in cached_pair:
            ttft(engine, prompt, name)
        cached = [ttft(engine, prompt, cached_pair[i % 2]) for i in range(repeats)]
    finally:
        engine.shutdown()
    return {"base model": base, "new checkpoint": new, "cached checkpoint": cached}


def bench_switch(model_dir: Path, dirs: list[Path], repeats: int) -> dict:
    model = load_model(model_dir, ModelConfig.from_dir(model_dir), "cpu", torch.float32, progress=False)
    manager = LoraManager(model)
    new = [timed(lambda d=d: manager.activate(d)) for d in dirs[2:]]
    for d in dirs[:2]:
        manager.activate(d)
    cached = [timed(lambda i=i: manager.activate(dirs[i % 2])) for i in range(repeats)]
    restore = []
    for i in range(repeats):
        manager.activate(dirs[i % 2])
        restore.append(timed(lambda: manager.activate(None)))
    return {"new adapter (read + merge)": new, "cached adapter (merge)": cached,
            "back to base (restore)": restore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: embedded model)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=32)
    args = parser.parse_args()
    model_dir = Path(args.model or fetch_default_model())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {model_dir.name}, float32, LoRA rank {args.rank}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_adapters(model_dir, root, args.repeats + 2, args.rank)
        size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        print(f"adapter: {size / 2**20:.1f} MiB on disk")
        names = [f"tinker://{RUN}/sampler_weights/{d.name}" for d in dirs]
        prompt = list(range(100, 100 + args.prompt_len))
        ttfts = bench_engine(model_dir, root, names, prompt, args.repeats)
        switches = bench_switch(model_dir, dirs, args.repeats)
    baseline = median_ms(ttfts["base model"])
    print(f"time to first token ({args.prompt_len}-token prompt), median:")
    for label, samples in ttfts.items():
        print(f"  {label:26s} {median_ms(samples):8.1f} ms   {median_ms(samples) / baseline:5.2f}x base")
    print("switch alone (LoraManager.activate), median:")
    for label, samples in switches.items():
        print(f"  {label:26s} {median_ms(samples):8.1f} ms")


if __name__ == "__main__":
    main()
