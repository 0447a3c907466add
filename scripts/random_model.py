"""A model directory of another's shape with random weights: its config, tokenizer and
chat template copied, the weights drawn by transformers' own initialisation.

For a machine where the embedded default model cannot be fetched (a lent GPU reaches no
registry): benchmarks of the engine's speed need the shape, not the trained weights.

    python scripts/random_model.py SOURCE_DIR OUT_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

# Everything of a model directory but its weights.
NOT_WEIGHTS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def save_random_model(source: Path, out: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in NOT_WEIGHTS:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a model directory (its weights are not read)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    print(save_random_model(args.source, args.out, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
