"""Paged attention against dense attention written out by hand, per sequence."""

from __future__ import annotations

from types import SimpleNamespace

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


# (tokens already cached, new tokens): three decodes, shortest first, far enough apart to
# be split into two groups; then two prefill chunks.
LAYOUT = [(2, 1), (3, 1), (30, 1), (0, 7), (12, 14)]


def paged_batch(dtype: torch.dtype, gen: torch.Generator):
    """LAYOUT's sequences in a cache of scattered blocks, this step's k/v stored:
    (kv_cache, meta, queries [num_tokens, H, D], per sequence (k, v) [len, KVH, D])."""
    num_blocks = 60
    kv_cache = torch.zeros(2 * NUM_KV_HEADS, num_blocks, BLOCK, HEAD_DIM, dtype=dtype)
    free = iter(torch.randperm(num_blocks, generator=gen).tolist())   # scattered blocks
    tables, seq_kv, slots, queries = [], [], [], []
    for cached, new in LAYOUT:
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
        slot_mapping=torch.cat(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=[c + n for c, n in LAYOUT], query_lens=[n for _, n in LAYOUT],
        num_decodes=3, block_size=BLOCK)
    new_kv = torch.cat([torch.cat((k, v), dim=1)[c:] for (k, v), (c, _) in zip(seq_kv, LAYOUT)])
    store_kv(kv_cache, new_kv, meta.slot_mapping)                        # this step
    return kv_cache, meta, torch.cat(queries), seq_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_decode_and_prefill_batch_matches_dense_attention(dtype, monkeypatch):
    monkeypatch.setattr(attention, "GROUP_COST_KEYS", 16)   # split even these short decodes
    kv_cache, meta, q, seq_kv = paged_batch(dtype, torch.Generator().manual_seed(0))
    assert [(g.num_seqs, g.num_queries) for g in meta.groups] == [(2, 1), (1, 1), (1, 7), (1, 14)]
    out = paged_attention(q, kv_cache, meta, scale=HEAD_DIM ** -0.5)
    queries = q.split([n for _, n in LAYOUT])
    want = torch.cat([dense_attention(q, k, v, HEAD_DIM ** -0.5)
                      for q, (k, v) in zip(queries, seq_kv)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def gpt_oss_attention(q, k, v, sinks, window, scale):
    """transformers' gpt-oss eager attention on one sequence, in float32: q [Q, H, D], the
    last Q positions of a sequence whose k, v: [L, KVH, D] -> [Q, H, D]."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    num_q, num_k = q.shape[0], k.shape[0]
    sees = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    query_pos = (num_k - num_q + torch.arange(num_q))[:, None]             # [Q, 1]
    allowed = sees(0, 0, query_pos, torch.arange(num_k)[None, :])          # [Q, L]
    additive = torch.zeros(num_q, num_k).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=NUM_HEADS // NUM_KV_HEADS, sinks=sinks.float(),
                             training=False)
    q, k, v = (t.float().transpose(0, 1)[None] for t in (q, k, v))       # [1, heads, len, D]
    out, _ = eager_attention_forward(module, q, k, v, additive[None, None], scaling=scale)
    return out[0]                                                        # [Q, H, D]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_and_sliding_window_match_transformers_gpt_oss_attention(dtype, window, monkeypatch):
    monkeypatch.setattr(attention, "GROUP_COST_KEYS", 16)
    gen = torch.Generator().manual_seed(1)
    kv_cache, meta, q, seq_kv = paged_batch(dtype, gen)
    sinks = (2 * torch.randn(NUM_HEADS, generator=gen)).to(dtype)   # large enough to matter
    out = paged_attention(q, kv_cache, meta, HEAD_DIM ** -0.5, sinks=sinks, window=window)
    queries = q.split([n for _, n in LAYOUT])
    want = torch.cat([gpt_oss_attention(q, k, v, sinks, window, HEAD_DIM ** -0.5)
                      for q, (k, v) in zip(queries, seq_kv)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("on_cpu_decode_path", [True, False])
def test_sliding_window_without_sinks_masks_both_paths(on_cpu_decode_path, monkeypatch):
    """Models with a window and no sinks keep SDPA for prefill; decodes take either path."""
    if not on_cpu_decode_path:   # send the decodes through SDPA too, as on a GPU
        monkeypatch.setattr(attention, "_explicit_attention", _sdpa_only)
    kv_cache, meta, q, seq_kv = paged_batch(torch.float32, torch.Generator().manual_seed(2))
    out = paged_attention(q, kv_cache, meta, HEAD_DIM ** -0.5, window=5)
    queries = q.split([n for _, n in LAYOUT])
    no_sinks = torch.full((NUM_HEADS,), float("-inf"))                 # exp(-inf) = 0: no sink
    want = torch.cat([gpt_oss_attention(q, k, v, no_sinks, 5, HEAD_DIM ** -0.5)
                      for q, (k, v) in zip(queries, seq_kv)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _sdpa_only(q, k, v, mask, scale, sinks):
    assert sinks is None
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=True)
    return out.transpose(1, 2)


def test_decodes_of_one_length_share_one_group():
    assert _split_decodes([100] * 8) == [(0, 8)]


def test_decodes_split_where_the_padding_saved_outweighs_a_group():
    lens = [10] * 20 + [200] * 20 + [1000] * 20
    # Halved at 40 (saves 32,000 padded keys), then [0, 40) at 20 (saves 3,800); the last
    # twenty have nothing to save.
    assert _split_decodes(lens) == [(0, 20), (20, 40), (40, 60)]
