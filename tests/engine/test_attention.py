"""Paged attention against dense attention written out by hand, per sequence."""

from __future__ import annotations

import pytest
import torch

from engine.layers.attention import AttentionMetadata, paged_attention, store_kv

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def dense_attention(q, k, v, scale):
    """q: [Q, H, D] the last Q positions of a sequence whose k, v: [L, KVH, D]."""
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # [L, H, D]
    scores = torch.einsum("qhd,lhd->hql", q.float(), k.float()) * scale
    num_q, num_k = q.shape[0], k.shape[0]
    causal = torch.arange(num_k)[None, :] <= (num_k - num_q + torch.arange(num_q))[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_decode_and_prefill_batch_matches_dense_attention(dtype):
    gen = torch.Generator().manual_seed(0)
    # (tokens already cached, new tokens): three decodes, shortest first, far enough
    # apart to be split into two groups; then two prefill chunks.
    layout = [(2, 1), (3, 1), (30, 1), (0, 7), (12, 14)]
    num_blocks = 60
    k_cache = torch.zeros(NUM_KV_HEADS, num_blocks, BLOCK, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = iter(torch.randperm(num_blocks, generator=gen).tolist())   # scattered blocks
    tables, seq_kv, slots, queries = [], [], [], []
    for cached, new in layout:
        total = cached + new
        table = [next(free) for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        pos_slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(total)])
        store_kv(k_cache, v_cache, k[:cached], v[:cached], pos_slots[:cached])   # earlier steps
        slots.append(pos_slots[cached:])
        tables.append(table)
        seq_kv.append((k, v))
        queries.append(torch.randn(new, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=[c + n for c, n in layout], query_lens=[n for _, n in layout],
        num_decodes=3, block_size=BLOCK)
    new_k = torch.cat([k[c:] for (k, _), (c, _) in zip(seq_kv, layout)])
    new_v = torch.cat([v[c:] for (_, v), (c, _) in zip(seq_kv, layout)])
    store_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)          # this step
    assert [(g.num_seqs, g.num_queries) for g in meta.groups] == [(2, 1), (1, 1), (1, 7), (1, 14)]
    out = paged_attention(torch.cat(queries), k_cache, v_cache, meta, scale=HEAD_DIM ** -0.5)
    want = torch.cat([dense_attention(q, k, v, HEAD_DIM ** -0.5) for q, (k, v) in zip(queries, seq_kv)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
