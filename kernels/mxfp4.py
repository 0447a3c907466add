"""The product of an MXFP4 matrix in Triton, read packed: out = x @ W.T + bias.

W [N, K] stays as `blocks` uint8 [N, K / 32, 16] and `scales` uint8 [N, K / 32]
(kernels/mxfp4_ref.py has the format and the reference). Each program computes one
BLOCK_M x BLOCK_N tile of the output, walking the inner dimension in BLOCK_K steps: it
loads BLOCK_K / 2 bytes of each of its N rows, decodes both nibbles of each byte (e2m1,
arithmetically), multiplies them by their group's power of two (built from the scale's
bits: exact), and takes two products, the low nibbles (the even inputs) against the even
columns of x and the high nibbles against the odd ones, so nothing is interleaved. The
weights never exist dequantized outside the registers of one tile.

The tiles are fixed (no autotuning, no split of K), so, as in invariant_matmul.py, a
row's bits do not depend on how many rows share the launch. Scales 0 and 255 (2**-127,
and NaN in the OCP format) come out as 0 and infinity; checkpoints do not use them. Under
the Triton interpreter the products are taken in float32 (its `tl.dot` reads bfloat16
operands as integers, Triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.invariant_matmul import interpreted

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64        # BLOCK_K: two groups of 32 inputs


@triton.jit
def _e2m1(nibble):
    """4-bit floats (sign, two exponent bits, one mantissa bit) -> float32."""
    exponent = (nibble >> 1) & 3
    mantissa = (nibble & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    magnitude = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where((nibble & 8) != 0, -magnitude, magnitude)


@triton.jit
def _mxfp4_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                  stride_om, HAS_BIAS: tl.constexpr, FLOAT32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows[:, None] < M, cols[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K // 2, BLOCK_K // 2):
        pairs = start + tl.arange(0, BLOCK_K // 2)                     # byte b: inputs 2b, 2b+1
        pair_ok = pairs < K // 2
        x_even = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + 2 * pairs[None, :],
                         mask=row_ok & pair_ok[None, :], other=0.0)    # [BM, BK/2]
        x_odd = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + 2 * pairs[None, :] + 1,
                        mask=row_ok & pair_ok[None, :], other=0.0)
        w_ok = col_ok & pair_ok[:, None]
        byte = tl.load(blocks_ptr + cols[None, :].to(tl.int64) * (K // 2) + pairs[:, None],
                       mask=w_ok, other=0).to(tl.int32)                # [BK/2, BN]
        scale = tl.load(scales_ptr + cols[None, :].to(tl.int64) * (K // 32) + pairs[:, None] // 16,
                        mask=w_ok, other=0).to(tl.int32)               # each byte's group's
        factor = (scale << 23).to(tl.float32, bitcast=True)            # 2 ** (scale - 127)
        low, high = _e2m1(byte & 15) * factor, _e2m1(byte >> 4) * factor
        if FLOAT32:  # full-precision products, not TF32
            acc = tl.dot(x_even.to(tl.float32), low, acc, input_precision="ieee")
            acc = tl.dot(x_odd.to(tl.float32), high, acc, input_precision="ieee")
        else:        # the exact weights in the model's half precision, on the tensor cores
            dtype = x_ptr.dtype.element_ty
            acc = tl.dot(x_even, low.to(dtype), acc)
            acc = tl.dot(x_odd, high.to(dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok & col_ok)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias [N]) for the packed W [N, K] -> [M, N] in x's dtype."""
    n, groups, group_bytes = blocks.shape
    if x.dim() != 2 or group_bytes != 16 or x.shape[1] != groups * 32 or (
            scales.shape != blocks.shape[:-1]):
        raise ValueError(f"need x [M, K], blocks [N, K / 32, 16] and scales [N, K / 32], got "
                         f"{tuple(x.shape)}, {tuple(blocks.shape)} and {tuple(scales.shape)}")
    x, blocks, scales = x.contiguous(), blocks.contiguous(), scales.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _mxfp4_kernel[grid](x, blocks, scales, bias if bias is not None else x, out, m, n, k,
                        x.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                        FLOAT32=x.dtype == torch.float32 or interpreted(), BLOCK_M=BLOCK_M,
                        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
