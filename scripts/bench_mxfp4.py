"""One gpt-oss MoE layer with its MXFP4 experts kept packed, against the same layer
dequantized once (the default), at gpt-oss-20b's shape.

Hidden 2880, 32 experts of width 2880, top 4, clamped SwiGLU, biases; random MXFP4
experts (scales of 2**-9 to 2**-6), the dequantized twin holding the same weights in
bfloat16 (so both compute the same products). For 1, 8 and 64 tokens, each side timed in
turn round after round (median): what `--quantization mxfp4` costs a step in time for a
quarter of the experts' memory. The packed side dequantizes each expert a step gives
tokens to (kernels.mxfp4_ref), in plain PyTorch; on CUDA it runs the Triton kernel
that reads them packed (kernels/mxfp4.py).

    .venv/bin/python scripts/bench_mxfp4.py [--tokens 1 8 64] [--rounds 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_moe import time_in_turn  # noqa: E402
from bench_sampling import device_name  # noqa: E402

from engine.layers.moe import SparseMoE  # noqa: E402
from engine.models.gpt_oss import clamped_swiglu, topk_softmax  # noqa: E402

HIDDEN, EXPERTS, WIDTH, TOP_K = 2880, 32, 2880, 4


def make_layer(mxfp4: bool) -> SparseMoE:
    return SparseMoE(HIDDEN, EXPERTS, WIDTH, partial(topk_softmax, top_k=TOP_K),
                     partial(clamped_swiglu, limit=7.0, alpha=1.702), router_bias=True,
                     expert_bias=True, mxfp4=mxfp4)


@torch.no_grad()
def build_layers() -> dict[str, SparseMoE]:
    """The packed layer and its dequantized twin, on the same random weights."""
    gen = torch.Generator().manual_seed(0)
    packed, full = make_layer(True), make_layer(False).to(torch.bfloat16)
    packed = packed.to(torch.bfloat16)
    for p in packed.parameters():
        if p.dtype == torch.uint8:
            high = 256 if p.dim() == 4 else 122        # blocks: any byte; scales: 2**-9..2**-6
            p.copy_(torch.randint(0 if p.dim() == 4 else 118, high, p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    full.load_state_dict({k: v for k, v in packed.state_dict().items()
                          if v.is_floating_point()}, strict=False)
    for name in ("gate_up_proj", "down_proj"):
        for e in range(EXPERTS):
            getattr(full.experts, name)[e] = packed.experts.weight(name, e, torch.bfloat16)
    return {"dequantized": full.requires_grad_(False), "packed": packed.requires_grad_(False)}


@torch.inference_mode()
def bench(layers: dict[str, SparseMoE], x: torch.Tensor, rounds: int) -> dict[str, float]:
    torch.testing.assert_close(layers["packed"](x), layers["dequantized"](x), atol=2e-2,
                               rtol=2e-2)                           # the same products
    return time_in_turn(layers, x, rounds)


def expert_bytes(layer: SparseMoE) -> int:
    return sum(p.nbytes for n, p in layer.experts.named_parameters() if not n.endswith("_bias"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device: {device_name(torch.device(args.device))}, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    layers = {name: layer.to(args.device) for name, layer in build_layers().items()}
    print("expert weights: " + ", ".join(f"{name} {expert_bytes(layer) / 1e6:.0f} MB"
                                         for name, layer in layers.items()))
    print("| tokens | dequantized ms | packed ms | packed / dequantized |\n|---|---|---|---|")
    for n in args.tokens:
        x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n)).bfloat16()
        x = x.to(args.device)
        t = bench(layers, x, args.rounds)
        print(f"| {n} | {t['dequantized'] * 1e3:.1f} | {t['packed'] * 1e3:.1f} | "
              f"{t['packed'] / t['dequantized']:.1f}x |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
