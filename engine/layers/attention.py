"""Attention over the paged KV cache: the plain-PyTorch reference path.

The cache of one layer is one tensor `[2 * num_kv_heads, num_blocks, block_size, head_dim]`:
the k heads, then the v heads, in the order the fused qkv projection produces them, so
one copy stores a step's new k and v and one `index_select` gathers them. A sequence's
tokens live in the blocks its block table lists, in order; token `j` of a sequence sits
in block `table[j // block_size]`, row `j % block_size`. Heads come first so that
gathering a batch's blocks gives each head's keys contiguously, ready for a batched
matmul without another copy. Each step first writes the new tokens' k/v into their
slots, then every query attends to all of its sequence's cached tokens up to and
including its own position (a sliding-window layer: only the last `window` of them).

Two gpt-oss features ride on the same paths. A sliding window is one more mask over the
same gathered blocks: the cache is shared by all layers, so a sliding layer still reads
(and keeps) every block of the sequence. Attention *sinks* are a learned logit per head
that joins each query's softmax and carries no value, so the weights of the real keys
sum to less than one; SDPA has no such term, so attention with sinks takes the explicit
path (transformers runs gpt-oss without SDPA too).

Attention runs per *group*: decodes (one query each) are batched into at most two
groups of similar context length, so that short sequences do not gather the padding
of long ones; each prefill chunk is a group of its own. In the batch-invariant mode
(engine.layers.batch_invariant) every group goes through
kernels.invariant_attention_ref, whose result for a query does not depend on its group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.invariant_attention_ref import invariant_attention
from kernels.lora_mapping import LoraMapping

if TYPE_CHECKING:
    from engine.layers.linear_attention import StateSlotMetadata


@dataclass
class AttentionGroup:
    """Sequences attended together: all have `num_queries` new tokens, laid out
    consecutively from row `start` of the flat batch."""

    start: int
    num_seqs: int
    num_queries: int
    block_size: int
    block_tables: torch.Tensor   # [num_seqs, num_blocks], enough blocks for the longest
    context_lens: torch.Tensor   # [num_seqs]
    # Gathered k and v, allocated by the first layer and refilled by every other one.
    kv: torch.Tensor | None = None
    # Masks by sliding window (None: full attention), built by the first layer that needs one.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.num_seqs * self.num_queries)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """bool [num_seqs, 1, num_queries, num_blocks * block_size]: the keys each query sees."""
        if window not in self.masks:
            num_keys = self.block_tables.shape[1] * self.block_size
            self.masks[window] = _mask(self.context_lens, self.num_queries, num_keys, window)
        return self.masks[window]


@dataclass
class AttentionMetadata:
    """How the flat batch of new tokens splits into sequences.

    Sequences are ordered decodes first (one new token each, shortest context first),
    then prefill chunks. The groups depend only on this layout, not on the layer, so
    they are built once per step.

    `lora` travels with it, for the same reason: in a step that mixes checkpoints, the
    rows grouped by adapter slot, which every adapted layer reads (None: the weights as
    they are, merged or base, serve every row).
    """

    slot_mapping: torch.Tensor   # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor   # [num_seqs, max_blocks] int, padded with 0
    context_lens: list[int]      # per sequence: tokens in the cache after this step
    query_lens: list[int]        # new tokens per sequence (sums to num_tokens)
    num_decodes: int             # the first num_decodes sequences have query_len 1
    block_size: int
    lora: LoraMapping | None = None                # steps that mix checkpoints
    state_slots: StateSlotMetadata | None = None   # models with linear-attention layers

    def __post_init__(self) -> None:
        lens = self.context_lens
        spans = _split_decodes(lens[:self.num_decodes])
        spans += [(i, i + 1) for i in range(self.num_decodes, len(lens))]
        self.groups, start = [], 0
        for first, end in spans:
            num_queries = self.query_lens[first]
            num_blocks = -(-max(lens[first:end]) // self.block_size)
            self.groups.append(AttentionGroup(
                start, end - first, num_queries, self.block_size,
                self.block_tables[first:end, :num_blocks],
                torch.tensor(lens[first:end], device=self.block_tables.device)))
            start += (end - first) * num_queries


# A group costs about as much as gathering and attending this many padded keys (sequences
# x key positions) more, in the per-layer ops it adds; measured on the CPU (BENCHMARKS.md).
GROUP_COST_KEYS = 2048
MAX_DECODE_SPLITS = 2     # halvings: at most 4 decode groups


def _split_decodes(lens: list[int], start: int = 0, end: int | None = None,
                   splits: int = MAX_DECODE_SPLITS) -> list[tuple[int, int]]:
    """Spans [first, end) of the decodes, sorted by context length, attended together.

    Each group pads to its own longest context, so short sequences do not gather the
    padding of long ones; a span is halved where that saves more padded keys than a
    group costs, and each half again, `splits` levels deep."""
    end = len(lens) if end is None else end
    if end - start < 2 or splits == 0:
        return [(start, end)] if end > start else []
    padded = lambda i: (i - start) * lens[i - 1] + (end - i) * lens[end - 1]  # noqa: E731
    best = min(range(start + 1, end), key=padded)
    if (end - start) * lens[end - 1] - padded(best) < GROUP_COST_KEYS:
        return [(start, end)]
    return (_split_decodes(lens, start, best, splits - 1)
            + _split_decodes(lens, best, end, splits - 1))


def _mask(context_lens: torch.Tensor, num_queries: int, num_keys: int,
          window: int | None) -> torch.Tensor:
    """bool [num_seqs, 1, num_queries, num_keys]: query i (the last `num_queries` tokens of
    its sequence) sees every cached key at or before its own position, and with a sliding
    window only the last `window` of those (itself included), as transformers' mask does."""
    key_pos = torch.arange(num_keys, device=context_lens.device)[None, None, :]    # [1, 1, L]
    query_pos = (context_lens[:, None] - num_queries
                 + torch.arange(num_queries, device=context_lens.device))[:, :, None]  # [S, Q, 1]
    seen = key_pos <= query_pos
    if window is not None:
        seen &= key_pos > query_pos - window
    return seen.unsqueeze(1)


def store_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv: [num_tokens, 2 * num_kv_heads, head_dim], the k heads then the v heads."""
    kv_cache.view(kv_cache.shape[0], -1, kv.shape[-1])[:, slot_mapping] = kv.transpose(0, 1)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sinks: torch.Tensor | None = None,
                    window: int | None = None, batch_invariant: bool = False) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] (a view is fine) -> a new tensor of that shape.

    sinks: [num_heads], one extra logit per head (gpt-oss); window: a sliding-window
    layer's span in tokens (None: full attention)."""
    attend = _attend_invariant if batch_invariant else _attend
    outs = [attend(q[g.rows].view(g.num_seqs, g.num_queries, *q.shape[1:]), kv_cache, g, scale,
                   sinks, window).reshape(-1, *q.shape[1:]) for g in meta.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _attend_invariant(q: torch.Tensor, kv_cache: torch.Tensor, group: AttentionGroup,
                      scale: float, sinks: torch.Tensor | None,
                      window: int | None) -> torch.Tensor:
    attend = invariant_attention
    if q.is_cuda:    # the Triton twin (imports triton, which CUDA machines have)
        from kernels.invariant_attention import invariant_attention as attend
    return attend(q, kv_cache, group.block_tables, group.context_lens, scale, sinks, window)


def _attend(q: torch.Tensor, kv_cache: torch.Tensor, group: AttentionGroup, scale: float,
            sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """q: [num_seqs, num_queries, num_heads, head_dim], the last queries of each sequence."""
    group.kv = _gather_blocks(kv_cache, group.block_tables, out=group.kv)    # [2 * KVH, S, L, D]
    k, v = group.kv.chunk(2)
    mask = group.mask(window)
    # For one query per sequence, PyTorch's CPU SDPA kernel is about 3x slower than two
    # plain matmuls in half precision, and a little slower in float32: see BENCHMARKS.md.
    if sinks is not None or (q.device.type == "cpu" and q.shape[1] == 1):
        return _explicit_attention(q, k, v, mask, scale, sinks)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)                                              # [S, Q, H, D]


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's blocks, in order: [cache heads, num_seqs, num_blocks * block_size, head_dim].

    index_select copies whole blocks; on the CPU it is 1.5x (float32) to 4x (bfloat16)
    faster than the equivalent advanced indexing `cache[:, block_tables]`.
    """
    num_seqs, num_blocks = block_tables.shape
    heads, _, block_size, head_dim = cache.shape
    if out is not None:
        out = out.view(heads, -1, block_size, head_dim)
    picked = torch.index_select(cache, 1, block_tables.flatten(), out=out)  # [heads, S * nb, BS, D]
    return picked.view(heads, num_seqs, num_blocks * block_size, head_dim)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """SDPA's math written out, plus the sinks, for q: [S, Q, H, D], k and v: [KVH, S, L, D]
    and mask: [S, 1, Q, L] -> [S, Q, H, D].

    Scores and softmax in float32, as SDPA keeps them (transformers' eager attention keeps
    half-precision scores, which cost a decode up to 1e-3 against the same position
    computed by the prefill path); the probabilities meet v in v's dtype, as in SDPA."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    kv_heads = k.shape[0]
    group = num_heads // kv_heads
    # Query heads grouped by the kv head they share (head h uses kv head h // G), each
    # group's queries side by side so one matmul per kv head serves them: [KVH, S, G * Q, D]
    q = (q.float() * scale).view(num_seqs, num_queries, kv_heads, group, head_dim)
    q = q.permute(2, 0, 3, 1, 4).reshape(kv_heads, num_seqs, group * num_queries, head_dim)
    scores = (q @ k.float().transpose(-1, -2)).view(kv_heads, num_seqs, group, num_queries, -1)
    scores.masked_fill_(~mask[None], float("-inf"))                    # mask: [1, S, 1, Q, L]
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        # The sink is one more column of each head's scores; its probability is dropped.
        sink = sinks.to(scores.dtype).view(kv_heads, 1, group, 1, 1)
        sink = sink.expand(kv_heads, num_seqs, group, num_queries, 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
    out = probs.to(v.dtype).view(kv_heads, num_seqs, group * num_queries, -1) @ v  # [.., G*Q, D]
    out = out.view(kv_heads, num_seqs, group, num_queries, head_dim).permute(1, 3, 0, 2, 4)
    return out.reshape(num_seqs, num_queries, num_heads, head_dim)
