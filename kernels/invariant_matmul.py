"""A batch-invariant matmul in Triton: out = x @ weight.T + bias, a row's bits its own.

Each program computes one BLOCK_M x BLOCK_N tile of the output, walking the inner
dimension in BLOCK_K steps from the first, into a float32 accumulator: no split of the
inner dimension across programs and no tile size chosen by the problem's shape (no
autotuning), so every output element goes through the same sequence of products and
sums whatever the number of rows M. A kernel that picks a faster configuration for a
small M (as cuBLAS does) changes that sequence, and with it the last bits of a row
when the batch around it grows; this one costs some speed at small M instead
(Thinking Machines' batch-invariant ops make the same trade).

The reference is a float32 `F.linear` (`reference`); the bits differ from it (another
summation order) but not with M. Under the Triton interpreter half-precision tiles are
multiplied in float32: its `tl.dot` reads bfloat16 operands as integers (Triton 3.9).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, FLOAT32: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        inner = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + inner[None, :],
                    mask=(rows[:, None] < M) & (inner[None, :] < K), other=0.0)   # [BM, BK]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + inner[:, None],
                    mask=(cols[None, :] < N) & (inner[:, None] < K), other=0.0)   # [BK, BN]
        if FLOAT32:  # full-precision products, not TF32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:        # half precision on the tensor cores, accumulated in float32
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _matmul_kernel[grid](x, weight, bias if bias is not None else x, out, m, n, k, x.stride(0),
                         weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         FLOAT32=x.dtype == torch.float32 or interpreted(), BLOCK_M=BLOCK_M,
                         BLOCK_N=BLOCK_N,
                         BLOCK_K=BLOCK_K)
    return out


def interpreted() -> bool:
    """Whether kernels run in the Triton interpreter (TRITON_INTERPRET=1, no GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `matmul` computes, in plain PyTorch (float32 products, rounded once to x's dtype)."""
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), bias).to(x.dtype)
