"""MXFP4 matrices in plain PyTorch: dequantizing one, and the product that reads one packed.

MXFP4 (the OCP microscaling format) keeps weights in groups of 32 that share one scale:
- each weight is a 4-bit float, e2m1: a sign bit, two exponent bits and one mantissa
  bit, so one of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (`FP4_VALUES`, indexed by the 4 bits);
- each group's scale is a power of two, stored as an 8-bit exponent biased by 127.

A matrix [out, in] is held as `blocks`, uint8 [out, in / 32, 16] (each group's 32
values, two per byte, the low nibble first), and `scales`, uint8 [out, in / 32] (each
group's exponent + 127): 4.25 bits a weight against bfloat16's 16. Every value times its
power-of-two scale is exact in bfloat16 and float32, so a dequantized matrix is the same
whatever the route (transformers' `convert_moe_packed_tensors` gives the same bits).

`mxfp4_linear` is the reference product: it dequantizes the whole matrix, then one
`F.linear`. The Triton kernel that reads the packed bytes in its inner loop
(kernels/mxfp4.py) is tested against it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SCALE_BIAS = 127
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: each byte's two values, the low nibble's first (one lookup per
    byte, not per nibble), made once per device."""
    pairs = [[FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]] for b in range(256)]
    return torch.tensor(pairs, dtype=torch.float32, device=device)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks: uint8 [out, G, 16], scales: uint8 [out, G] -> the matrix [out, G * 32] in `dtype`."""
    out_dim, num_groups, _ = blocks.shape
    pairs = _byte_values(blocks.device).index_select(0, blocks.flatten().int())  # [out*G*16, 2]
    values = pairs.view(out_dim, num_groups, 32)
    # values * 2 ** exponent in float32, as torch.ldexp (transformers' way) gives it, in two
    # exact powers of two: 2 ** exponent alone overflows at exponent 128 (scale 255).
    exponent = scales.to(torch.int32) - SCALE_BIAS                        # [out, G]
    half = torch.div(exponent, 2, rounding_mode="floor")
    values.mul_(torch.pow(2.0, half)[..., None]).mul_(torch.pow(2.0, exponent - half)[..., None])
    return values.to(dtype).view(out_dim, num_groups * 32)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, in] @ W.T + bias for the packed W [out, in] (blocks, scales as above) -> [n, out]."""
    return F.linear(x, dequantize(blocks, scales, x.dtype), bias)
