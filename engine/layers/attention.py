"""Attention over the paged KV cache: the plain-PyTorch reference path.

The cache of one layer is two tensors `[num_kv_heads, num_blocks, block_size, head_dim]`.
A sequence's tokens live in the blocks its block table lists, in order; token `j` of a
sequence sits in block `table[j // block_size]`, row `j % block_size`. Heads come first
so that gathering a batch's blocks gives each head's keys contiguously, ready for a
batched matmul without another copy. Each step first
writes the new tokens' k/v into their slots, then every query attends to all of its
sequence's cached tokens up to and including its own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """How the flat batch of new tokens splits into sequences.

    Sequences are ordered decodes first (one new token each), then prefill chunks. The
    masks depend only on this layout, not on the layer, so they are built once per step.
    """

    slot_mapping: torch.Tensor   # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor   # [num_seqs, max_blocks] int, padded with 0
    context_lens: torch.Tensor   # [num_seqs] tokens in the cache after this step
    query_lens: list[int]        # new tokens per sequence (sums to num_tokens)
    num_decodes: int             # the first num_decodes sequences have query_len 1
    block_size: int

    def __post_init__(self) -> None:
        nd, bs = self.num_decodes, self.block_size
        # Decodes gather up to their own longest context, not a prefill chunk's.
        decode_blocks = -(-int(self.context_lens[:nd].max()) // bs) if nd else 0
        self.decode_tables = self.block_tables[:nd, :decode_blocks]
        self.decode_mask = _mask(self.context_lens[:nd], 1, decode_blocks * bs)
        # Each prefill chunk gathers only its own blocks.
        self.prefill_tables, self.prefill_masks = [], []
        for i in range(nd, len(self.query_lens)):
            num_blocks = -(-int(self.context_lens[i]) // bs)
            self.prefill_tables.append(self.block_tables[i:i + 1, :num_blocks])
            self.prefill_masks.append(_mask(self.context_lens[i:i + 1], self.query_lens[i],
                                            num_blocks * bs))


def _mask(context_lens: torch.Tensor, num_queries: int, num_keys: int) -> torch.Tensor:
    """bool [num_seqs, 1, num_queries, num_keys]: query i (the last `num_queries` tokens of
    its sequence) sees every cached key at or before its own position."""
    key_pos = torch.arange(num_keys, device=context_lens.device)                   # [L]
    query_pos = (context_lens[:, None] - num_queries
                 + torch.arange(num_queries, device=context_lens.device))         # [S, Q]
    return (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, num_kv_heads, head_dim]; caches viewed as [KVH, num_slots, head_dim]
    k_cache.view(k_cache.shape[0], -1, k.shape[-1])[:, slot_mapping] = k.transpose(0, 1)
    v_cache.view(v_cache.shape[0], -1, v.shape[-1])[:, slot_mapping] = v.transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _attend(q[:nd].unsqueeze(1), k_cache, v_cache, meta.decode_tables,
                           meta.decode_mask, scale).squeeze(1)
    start = nd
    for table, mask, n in zip(meta.prefill_tables, meta.prefill_masks, meta.query_lens[nd:]):
        out[start:start + n] = _attend(q[start:start + n].unsqueeze(0), k_cache, v_cache,
                                       table, mask, scale).squeeze(0)
        start += n
    return out


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_tables: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [num_seqs, num_queries, num_heads, head_dim], the last queries of each sequence."""
    # Gather each sequence's blocks: [num_kv_heads, num_seqs, num_blocks * block_size, head_dim]
    k = k_cache[:, block_tables].flatten(2, 3)
    v = v_cache[:, block_tables].flatten(2, 3)
    q = q.transpose(1, 2)                                                   # [S, H, Q, D]
    # PyTorch's CPU SDPA kernel is about 3x slower than two plain matmuls for one query
    # per sequence in half precision (and faster in float32): see BENCHMARKS.md.
    if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] == 1:
        out = _single_query_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)                                              # [S, Q, H, D]


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA's math written out for q: [S, H, 1, D], k and v: [KVH, S, L, D]."""
    num_seqs, num_heads, _, head_dim = q.shape
    # Query heads grouped by the kv head they share (head h uses kv head h // G): [KVH, S, G, D]
    q = q.reshape(num_seqs, k.shape[0], -1, head_dim).transpose(0, 1)
    scores = (q @ k.transpose(-1, -2)).float() * scale                      # [KVH, S, G, L]
    scores.masked_fill_(~mask.transpose(0, 1), float("-inf"))               # mask: [1, S, 1, L]
    probs = scores.softmax(dim=-1).to(v.dtype)
    return (probs @ v).transpose(0, 1).reshape(num_seqs, num_heads, 1, head_dim)
