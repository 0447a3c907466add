"""Attention over the paged KV cache: the plain-PyTorch reference path.

The cache of one layer is two tensors `[num_kv_heads, num_blocks, block_size, head_dim]`.
A sequence's tokens live in the blocks its block table lists, in order; token `j` of a
sequence sits in block `table[j // block_size]`, row `j % block_size`. Heads come first
so that gathering a batch's blocks gives each head's keys contiguously, ready for a
batched matmul without another copy. Each step first writes the new tokens' k/v into
their slots, then every query attends to all of its sequence's cached tokens up to and
including its own position.

Attention runs per *group*: decodes (one query each) are batched into at most two
groups of similar context length, so that short sequences do not gather the padding
of long ones; each prefill chunk is a group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended together: all have `num_queries` new tokens, laid out
    consecutively from row `start` of the flat batch."""

    start: int
    num_seqs: int
    num_queries: int
    block_tables: torch.Tensor   # [num_seqs, num_blocks], enough blocks for the longest
    mask: torch.Tensor           # [num_seqs, 1, num_queries, num_blocks * block_size]
    # Gathered k and v, allocated by the first layer and refilled by every other one.
    buffers: list[torch.Tensor] | None = None


@dataclass
class AttentionMetadata:
    """How the flat batch of new tokens splits into sequences.

    Sequences are ordered decodes first (one new token each, shortest context first),
    then prefill chunks. The groups depend only on this layout, not on the layer, so
    they are built once per step.
    """

    slot_mapping: torch.Tensor   # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor   # [num_seqs, max_blocks] int, padded with 0
    context_lens: list[int]      # per sequence: tokens in the cache after this step
    query_lens: list[int]        # new tokens per sequence (sums to num_tokens)
    num_decodes: int             # the first num_decodes sequences have query_len 1
    block_size: int

    def __post_init__(self) -> None:
        lens = self.context_lens
        spans = _split_decodes(lens[:self.num_decodes])
        spans += [(i, i + 1) for i in range(self.num_decodes, len(lens))]
        self.groups, start = [], 0
        for first, end in spans:
            num_queries = self.query_lens[first]
            num_blocks = -(-max(lens[first:end]) // self.block_size)
            self.groups.append(AttentionGroup(
                start, end - first, num_queries, self.block_tables[first:end, :num_blocks],
                _mask(torch.tensor(lens[first:end], device=self.block_tables.device), num_queries,
                      num_blocks * self.block_size)))
            start += (end - first) * num_queries


def _split_decodes(lens: list[int]) -> list[tuple[int, int]]:
    """Split decodes (sorted by context length) in two where that saves at least a
    third of the padded keys; each group then pads only to its own longest context."""
    n = len(lens)
    if n < 2:
        return [(0, n)] if n else []
    padded = lambda i: i * lens[i - 1] + (n - i) * lens[-1]  # noqa: E731  keys gathered
    best = min(range(1, n), key=padded)
    return [(0, best), (best, n)] if 3 * padded(best) <= 2 * n * lens[-1] else [(0, n)]


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
    for g in meta.groups:
        rows = slice(g.start, g.start + g.num_seqs * g.num_queries)
        group_q = q[rows].view(g.num_seqs, g.num_queries, *q.shape[1:])
        out[rows] = _attend(group_q, k_cache, v_cache, g, scale).reshape(-1, *q.shape[1:])
    return out


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            group: AttentionGroup, scale: float) -> torch.Tensor:
    """q: [num_seqs, num_queries, num_heads, head_dim], the last queries of each sequence."""
    if group.buffers is None:
        group.buffers = [_gather_blocks(k_cache, group.block_tables),      # [KVH, S, L, D]
                         _gather_blocks(v_cache, group.block_tables)]
    else:
        _gather_blocks(k_cache, group.block_tables, out=group.buffers[0])
        _gather_blocks(v_cache, group.block_tables, out=group.buffers[1])
    k, v = group.buffers
    mask = group.mask
    q = q.transpose(1, 2)                                                   # [S, H, Q, D]
    # PyTorch's CPU SDPA kernel is about 3x slower than two plain matmuls for one query
    # per sequence in half precision (and faster in float32): see BENCHMARKS.md.
    if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] == 1:
        out = _single_query_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)                                              # [S, Q, H, D]


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's blocks, in order: [num_kv_heads, num_seqs, num_blocks * block_size, head_dim].

    index_select copies whole blocks; on the CPU it is 1.5x (float32) to 4x (bfloat16)
    faster than the equivalent advanced indexing `cache[:, block_tables]`.
    """
    num_seqs, num_blocks = block_tables.shape
    kvh, _, block_size, head_dim = cache.shape
    picked = torch.index_select(cache, 1, block_tables.flatten(),          # [KVH, S * nb, BS, D]
                                out=None if out is None else out.view(kvh, -1, block_size, head_dim))
    return picked.view(kvh, num_seqs, num_blocks * block_size, head_dim)


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
