"""Triton kernels of the segmented LoRA product: the contracts of kernels/lora_ref.py.

Both read the rows of each group through `LoraMapping.rows` (no gathered copy of x) and
the factors of the group's slot straight from the stacks (no copy of A or B).

- shrink: one program per (group, block of its rows, block of W columns): t = x @ A^T
  over K in blocks, accumulated in float32. Blocks past a group's rows stay zero.
- expand: one program per (group, block of rows, block of one slice's columns): the
  block's delta t[:, j*R:(j+1)*R] @ B^T is added into y. Slices may overlap (an adapter
  of a whole fused projection beside one of its parts), so they are launched in sets of
  disjoint slices, one after the other: within a launch each (row, column) of y belongs
  to one group and one program, so the add needs no atomics and is deterministic.

Tiles are multiplied in float32 (`input_precision="ieee"`: no TF32), whatever the storage
dtype: the reference's accuracy, and the LoRA products are small next to the base
projection's (rank x in per row, against out x in).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from kernels.lora_mapping import LoraMapping
from kernels.lora_ref import Slices

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, rows_ptr, lens_ptr, slots_ptr, M, K, W,
                   stride_xt, stride_as, stride_ak, stride_aw, stride_tg, stride_tm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    g, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_rows = tl.load(lens_ptr + g)
    if pid_m * BLOCK_M >= num_rows:
        return                                    # t is zero there already
    slot = tl.load(slots_ptr + g)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < num_rows
    rows = tl.load(rows_ptr + g * M + offs_m, mask=row_ok, other=0)
    a_base = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_aw,
                    mask=k_ok[:, None] & (offs_n[None, :] < W), other=0.0)
        acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    out = t_ptr + g * stride_tg + offs_m[:, None] * stride_tm + offs_n[None, :]
    tl.store(out, acc.to(t_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < W))


@triton.jit
def _expand_kernel(t_ptr, b_ptr, y_ptr, rows_ptr, lens_ptr, slots_ptr, index_ptr, starts_ptr,
                   sizes_ptr, M, R, tiles_per_slice, stride_tg, stride_tm, stride_bs, stride_bn,
                   stride_br, stride_yt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    g, pid_m, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i, tile = pid // tiles_per_slice, pid % tiles_per_slice    # the launch's i-th slice
    num_rows = tl.load(lens_ptr + g)
    size = tl.load(sizes_ptr + i)
    if (pid_m * BLOCK_M >= num_rows) | (tile * BLOCK_N >= size):
        return
    slot = tl.load(slots_ptr + g)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < num_rows, offs_n < size
    rows = tl.load(rows_ptr + g * M + offs_m, mask=row_ok, other=0)
    cols = tl.load(starts_ptr + i) + offs_n
    j = tl.load(index_ptr + i)                                  # its place in `slices`: t's columns
    b_base = b_ptr + slot * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < R
        t = tl.load(t_ptr + g * stride_tg + offs_m[:, None] * stride_tm + (j * R + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + cols[None, :] * stride_bn + offs_k[:, None] * stride_br,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)       # [BLOCK_K, BLOCK_N]: B^T
        acc += tl.dot(t.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    out = y_ptr + rows[:, None] * stride_yt + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
    """Same contract as lora_ref.shrink: x [T, K], lora_a [S, K, W] -> t [G, M, W]."""
    _check_rows(x, "x")
    num_groups, max_rows = mapping.rows.shape
    width = lora_a.shape[-1]
    t = torch.zeros(num_groups, max_rows, width, dtype=lora_a.dtype, device=x.device)
    grid = (num_groups, triton.cdiv(max_rows, BLOCK_M), triton.cdiv(width, BLOCK_N))
    _shrink_kernel[grid](x, lora_a, t, mapping.rows, mapping.lens, mapping.slots, max_rows,
                         x.shape[1], width, x.stride(0), *lora_a.stride(), t.stride(0),
                         t.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return t


def expand(t: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, mapping: LoraMapping,
           slices: Slices) -> None:
    """Same contract as lora_ref.expand: y [T, N] += each row's t @ B^T, slice by slice."""
    _check_rows(y, "y")
    _check_rows(t, "t")
    num_groups, max_rows = mapping.rows.shape
    for index, starts, sizes, largest in _disjoint_launches(tuple(slices), y.device):
        tiles = triton.cdiv(largest, BLOCK_N)
        grid = (num_groups, triton.cdiv(max_rows, BLOCK_M), len(index) * tiles)
        _expand_kernel[grid](t, lora_b, y, mapping.rows, mapping.lens, mapping.slots, index,
                             starts, sizes, max_rows, lora_b.shape[1], tiles, t.stride(0),
                             t.stride(1), lora_b.stride(0), lora_b.stride(2), lora_b.stride(1),
                             y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


Launch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


@lru_cache(maxsize=256)
def _disjoint_launches(slices: tuple[tuple[int, int], ...],
                       device: torch.device) -> list[Launch]:
    """The slices split into sets of pairwise disjoint ones, each as its launch's tables on
    `device` (the slices' places in `slices`, first columns, sizes) and its largest size;
    made once per layout (no copy per call)."""
    sets: list[list[int]] = []
    for j, (start, stop) in enumerate(slices):
        for members in sets:
            if all(stop <= slices[k][0] or slices[k][1] <= start for k in members):
                members.append(j)
                break
        else:
            sets.append([j])

    def table(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return [(table(s), table([slices[j][0] for j in s]),
             table([slices[j][1] - slices[j][0] for j in s]),
             max(slices[j][1] - slices[j][0] for j in s)) for s in sets]


def _check_rows(tensor: torch.Tensor, name: str) -> None:
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous rows, got strides {tensor.stride()}")
