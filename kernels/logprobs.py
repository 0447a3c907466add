"""Triton logprobs: log-softmax of the raw logits for the sampled token and the top-k.

One program per row, one pass over the vocabulary: an online log-sum-exp (running max
and rescaled sum, as in flash attention) and a running top-K list. Each logit is packed
into an int64 whose high half is its ordered key and whose low half is 2**31 - 1 - id,
so integer comparisons order by value and then put the lower token id first, exactly
like the reference's stable sort, and every packed value is distinct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling_search import ordered_key

BLOCK = 1024
MAX_TOP = 20


@triton.jit
def _merge_top(best, packed, num_top):
    """The num_top largest of best [K] and packed [BLOCK] (all distinct), largest first.

    Repeated max extraction: num_top <= 20 reductions beat a partial sort of the chunk.
    """
    slot = tl.arange(0, best.shape[0])
    merged = tl.full(best.shape, -(2**63), tl.int64)
    for i in range(num_top):
        top = tl.maximum(tl.max(packed, 0), tl.max(best, 0))
        merged = tl.where(slot == i, top, merged)
        packed = tl.where(packed == top, -(2**63), packed)
        best = tl.where(best == top, -(2**63), best)
    return merged


@triton.jit
def _logprobs_kernel(logits_ptr, stride, token_ptr, chosen_ptr, top_ids_ptr, top_lp_ptr, V,
                     num_top, TOP_PAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    m = -float("inf")
    s = 0.0
    best = tl.full([TOP_PAD], -(2**63), tl.int64)                 # packed keys, largest first
    slot = tl.arange(0, TOP_PAD)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)     # all -inf so far: sum stays 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
        # Padding lanes (key of -inf, ids >= V) rank below every real token.
        packed = (ordered_key(x).to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)
        # Most chunks hold nothing better than the current K-th: skip the merge.
        kth = tl.max(tl.where(slot == num_top - 1, best, -(2**63)), 0)
        if (num_top > 0) & (tl.max(packed, 0) > kth):
            best = _merge_top(best, packed, num_top)
    log_z = tl.log(s)
    token = tl.load(token_ptr + row)
    tl.store(chosen_ptr + row, tl.load(row_ptr + token).to(tl.float32) - m - log_z)
    ids = 0x7FFFFFFF - (best & 0xFFFFFFFF)                         # [TOP_PAD]
    want = slot < num_top
    top_lp = tl.load(row_ptr + ids, mask=want, other=0.0).to(tl.float32) - m - log_z
    tl.store(top_ids_ptr + row * num_top + slot, ids, mask=want)
    tl.store(top_lp_ptr + row * num_top + slot, top_lp, mask=want)


def logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
             num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as sampling_ref.logprobs: (chosen [B], top ids [B, k], top logprobs [B, k])."""
    if not 0 <= num_top <= MAX_TOP:
        raise ValueError(f"num_top must be in [0, {MAX_TOP}], got {num_top}")
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a [batch, vocab] tensor with contiguous rows, "
                         f"got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if num_top > vocab:
        raise ValueError(f"num_top ({num_top}) exceeds the vocabulary size ({vocab})")
    device = logits.device
    chosen = torch.empty(batch, dtype=torch.float32, device=device)
    top_ids = torch.empty(batch, num_top, dtype=torch.int64, device=device)
    top_lp = torch.empty(batch, num_top, dtype=torch.float32, device=device)
    top_pad = max(2, triton.next_power_of_2(num_top))          # block sizes are powers of two
    _logprobs_kernel[(batch,)](logits, logits.stride(0), token_ids.long().contiguous(), chosen,
                               top_ids, top_lp, vocab, num_top, TOP_PAD=top_pad, BLOCK=BLOCK,
                               num_warps=8)
    return chosen, top_ids, top_lp
