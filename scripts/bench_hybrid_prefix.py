"""Prefix caching on a hybrid (Qwen3.5) model: a shared system prompt, with and without it.

An eval or a chat front end sends many prompts that begin alike. Here `--requests`
prompts, each a shared `--prefix` of random tokens and its own 16-token question, go one
after another (one token each) to an engine over a random model of bench_hybrid_decode's
shape (Qwen3.5-9B's proportions at a quarter of its width, 3:1 Gated DeltaNet to gated
attention), once with prefix caching (the linear-attention states kept at block
boundaries: engine.state_snapshots) and once without. Prints the mean seconds to the
first token of a request after the first, the prompt tokens the model ran and those
served from the cache, and the ratio of the two runs.

With `--turns`, the requests are the turns of one conversation instead: each prompt is
the one before, its `--output` generated tokens and a question of its own (a chat, an
agent's rollout), so the cache serves the outputs too (the state kept at an output's
last block boundary).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_hybrid_prefix.py [--prefix 1024]
        [--requests 8] [--turns --output 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_evals import machine  # noqa: E402
from bench_hybrid_decode import SHAPE  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.models.default_model import fetch_default_model  # noqa: E402

QUESTION = 16


def save_hybrid_model(path: Path, dtype: torch.dtype) -> Path:
    """A random Qwen3.5 text model of SHAPE, with the default model's tokenizer (its
    vocabulary size: the model's ids are the tokenizer's)."""
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    layers = SHAPE["num_hidden_layers"]
    shape = {k: v for k, v in SHAPE.items() if k not in ("model_type", "vocab_size")}
    config = Qwen3_5TextConfig(**shape, vocab_size=49152, layer_types=[
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fetch_default_model() / name, path / name)
    return path


def measure(model_dir: Path, prompts: list[list[int]], caching: bool, dtype: torch.dtype,
            output: int, turns: bool) -> tuple[float, int, int]:
    """(mean seconds to the first token of a request after the first, prompt tokens run,
    tokens cached). With `turns`, each prompt follows the one before and its output."""
    engine = Engine(model_dir, progress=False, dtype=dtype, enable_prefix_caching=caching)
    try:
        params = SamplingParams(max_tokens=output, temperature=0.0, stop=[])
        seconds, history = [], []
        for prompt in tqdm(prompts, desc=f"prefix caching {'on' if caching else 'off'}",
                           leave=False):
            prompt = history + prompt if turns else prompt
            start = time.perf_counter()
            stream = engine.add_request(prompt, params)[0]
            outputs = [stream.get()]
            seconds.append(time.perf_counter() - start)
            outputs += list(stream) if not outputs[0].finished else []
            assert outputs[-1].finish_reason == "length", outputs[-1].error
            history = prompt + [token for out in outputs for token in out.token_ids]
        stats = engine.stats()
        return (sum(seconds[1:]) / len(seconds[1:]), stats.num_computed_prompt_tokens,
                stats.num_prefix_cached_tokens)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--turns", action="store_true",
                        help="the requests are turns of one conversation")
    parser.add_argument("--output", type=int, default=64,
                        help="tokens generated a turn, with --turns (default: %(default)s)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(args.prefix)]
    questions = [[rng.randrange(100, 40000) for _ in range(QUESTION)]
                 for _ in range(args.requests)]
    if args.turns:
        prompts, output = [prefix + questions[0], *questions[1:]], args.output
        print(f"machine: {machine()}; a conversation of {args.requests} turns after a "
              f"{args.prefix}-token prefix, each a {QUESTION}-token question and {output} "
              f"tokens of answer, {args.dtype}")
    else:
        prompts, output = [prefix + question for question in questions], 1
        print(f"machine: {machine()}; {args.requests} prompts of a {args.prefix}-token prefix "
              f"and {QUESTION} tokens of their own, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_hybrid_model(Path(tmp), dtype)
        results = {caching: measure(model_dir, prompts, caching, dtype, output, args.turns)
                   for caching in (False, True)}
    print("| prefix caching | s to the first token (after the first) | prompt tokens run "
          "| cached |")
    print("|---|---|---|---|")
    for caching, (seconds, computed, cached) in results.items():
        print(f"| {'on' if caching else 'off'} | {seconds:.3f} | {computed} | {cached} |")
    print(f"with it: {results[False][0] / results[True][0]:.1f}x sooner a first token")


if __name__ == "__main__":
    main()
