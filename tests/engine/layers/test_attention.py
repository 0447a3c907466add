"""Paged attention against dense attention written out by hand, per sequence."""

from __future__ import annotations

import pytest
import torch

from engine.layers import attention
from engine.layers.attention import AttentionMetadata, _split_decodes, paged_attention, store_kv

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
def test_mixed_decode_and_prefill_batch_matches_dense_attention(dtype, monkeypatch):
    monkeypatch.setattr(attention, "GROUP_COST_KEYS", 16)   # split even these short decodes
    gen = torch.Generator().manual_seed(0)
    # (tokens already cached, new tokens): three decodes, shortest first, far enough
    # apart to be split into two groups; then two prefill chunks.
    layout = [(2, 1), (3, 1), (30, 1), (0, 7), (12, 14)]
    num_blocks = 60
    kv_cache = torch.zeros(2 * NUM_KV_HEADS, num_blocks, BLOCK, HEAD_DIM, dtype=dtype)
    free = iter(torch.randperm(num_blocks, generator=gen).tolist())   # scattered blocks
    tables, seq_kv, slots, queries = [], [], [], []
    for cached, new in layout:
        total = cached + new
        table = [next(free) for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        pos_slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(total)])
        store_kv(kv_cache, torch.cat((k, v), dim=1)[:cached], pos_slots[:cached])   # earlier steps
        slots.append(pos_slots[cached:])
        tables.append(table)
        seq_kv.append((k, v))
        queries.append(torch.randn(new, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=[c + n for c, n in layout], query_lens=[n for _, n in layout],
        num_decodes=3, block_size=BLOCK)
    new_kv = torch.cat([torch.cat((k, v), dim=1)[c:] for (k, v), (c, _) in zip(seq_kv, layout)])
    store_kv(kv_cache, new_kv, meta.slot_mapping)                        # this step
    assert [(g.num_seqs, g.num_queries) for g in meta.groups] == [(2, 1), (1, 1), (1, 7), (1, 14)]
    out = paged_attention(torch.cat(queries), kv_cache, meta, scale=HEAD_DIM ** -0.5)
    want = torch.cat([dense_attention(q, k, v, HEAD_DIM ** -0.5) for q, (k, v) in zip(queries, seq_kv)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_decodes_of_one_length_share_one_group():
    assert _split_decodes([100] * 8) == [(0, 8)]


def test_decodes_split_where_the_padding_saved_outweighs_a_group():
    lens = [10] * 20 + [200] * 20 + [1000] * 20
    # Halved at 40 (saves 32,000 padded keys), then [0, 40) at 20 (saves 3,800); the last
    # twenty have nothing to save.
    assert _split_decodes(lens) == [(0, 20), (20, 40), (40, 60)]
