"""Batch-invariant paged attention in Triton, with fixed tiles: the CUDA path of the
batch-invariant mode. Same contract and layout as its reference,
kernels/invariant_attention_ref.py (read that first).

One program per (query tile, kv head): a tile is QUERY_TILE consecutive queries of one
sequence x the G heads that share the kv head, padded to BLOCK_M rows. It walks the
sequence's keys in blocks of KEY_BLOCK positions from the first, gathering each block's
keys and values from the paged cache through the block table, and keeps the online
softmax in float32. Every query is computed by a program of the same shape over the same
blocks in the same order, whether it is a decode or part of a prefill, whatever else the
launch holds, so its bits are its own. Under the Triton interpreter (no GPU) the tiles
are multiplied in float32, as in kernels/invariant_matmul.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.invariant_attention_ref import KEY_BLOCK, QUERY_TILE
from kernels.invariant_matmul import interpreted


@triton.jit
def _attention_kernel(q_ptr, cache_ptr, table_ptr, ctx_ptr, sinks_ptr, out_ptr,
                      num_queries, table_width, window, scale,
                      q_stride_s, q_stride_q, q_stride_h, c_stride_h, c_stride_b, c_stride_r,
                      KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HAS_SINKS: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, FLOAT32: tl.constexpr, QUERY_TILE: tl.constexpr,
                      KEY_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    tiles_per_seq = tl.cdiv(num_queries, QUERY_TILE)
    seq = tl.program_id(0) // tiles_per_seq
    tile = tl.program_id(0) % tiles_per_seq
    kv_head = tl.program_id(1)
    row = tl.arange(0, BLOCK_M)
    token = tile * QUERY_TILE + row // GROUP                   # the row's query in the sequence
    head = kv_head * GROUP + row % GROUP
    real = (row < QUERY_TILE * GROUP) & (token < num_queries)
    token = tl.minimum(token, num_queries - 1)                 # padding rows copy the last query
    context = tl.load(ctx_ptr + seq)
    position = context - num_queries + token                   # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * q_stride_s + token[:, None] * q_stride_q
                + head[:, None] * q_stride_h + dims[None, :])  # [BLOCK_M, D]
    q = (q.to(tl.float32) * scale)
    best = tl.full([BLOCK_M], -float("inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.max(tl.where(real, position, 0), 0)              # the tile's last position
    for start in range(0, last + 1, KEY_BLOCK):
        key_pos = start + tl.arange(0, KEY_BLOCK)
        entry = key_pos // BLOCK_SIZE
        block = tl.load(table_ptr + seq * table_width + entry,
                        mask=(key_pos < context) & (entry < table_width), other=0)
        slot = block.to(tl.int64) * c_stride_b + (key_pos % BLOCK_SIZE) * c_stride_r
        in_cache = (key_pos < context)[:, None]
        k = tl.load(cache_ptr + kv_head * c_stride_h + slot[:, None] + dims[None, :],
                    mask=in_cache, other=0.0)                  # [KEY_BLOCK, D]
        v = tl.load(cache_ptr + (KV_HEADS + kv_head) * c_stride_h + slot[:, None] + dims[None, :],
                    mask=in_cache, other=0.0)
        if FLOAT32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q.to(k.dtype), tl.trans(k))
        seen = key_pos[None, :] <= position[:, None]
        if HAS_WINDOW:
            seen &= key_pos[None, :] > position[:, None] - window
        scores = tl.where(seen, scores, -float("inf"))         # [BLOCK_M, KEY_BLOCK]
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == -float("inf"), 0.0, new_best)
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        total = total * rescale + tl.sum(weights, 1)
        if FLOAT32:
            acc = acc * rescale[:, None] + tl.dot(weights, v.to(tl.float32),
                                                  input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        new_best = tl.maximum(best, sink)
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.exp(sink - new_best)
        acc = acc * rescale[:, None]
    out = acc / total[:, None]
    tl.store(out_ptr + seq * q_stride_s + token[:, None] * q_stride_q + head[:, None] * q_stride_h
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def invariant_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float,
                        sinks: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """Same contract as kernels.invariant_attention_ref.invariant_attention."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    kv_heads, block_size = kv_cache.shape[0] // 2, kv_cache.shape[2]
    group = num_heads // kv_heads
    if kv_cache.stride(-1) != 1 or head_dim & (head_dim - 1):
        raise ValueError("the kernel needs a contiguous head dimension of a power of two")
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    grid = (num_seqs * triton.cdiv(num_queries, QUERY_TILE), kv_heads)
    _attention_kernel[grid](
        q, kv_cache, tables, context_lens.to(torch.int32).contiguous(),
        sinks if sinks is not None else q, out, num_queries, tables.shape[1], window or 0, scale,
        q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, HAS_SINKS=sinks is not None, HAS_WINDOW=window is not None,
        FLOAT32=q.dtype == torch.float32 or interpreted(), QUERY_TILE=QUERY_TILE,
        KEY_BLOCK=KEY_BLOCK, BLOCK_M=max(16, triton.next_power_of_2(QUERY_TILE * group)))
    return out
