"""Triton penalties and logit bias, applied to float32 logits in place.

Penalties (vLLM semantics, see sampling_ref.apply_penalties) take two steps:
1. `_tally_kernel` scatters each row's token ids into an int32 [B, V] tally with atomics:
   output tokens add 1 (the count), prompt tokens set bit 30 (seen in the prompt).
   A count never reaches 2**30, so the two never interfere, in any order.
2. `_penalize_kernel` walks logits and tally together and applies repetition (tokens seen
   anywhere), then frequency (times the output count) and presence (output count > 0).
Ids outside [0, V) are padding (rows are padded with -1) and are skipped.

The logit bias is sparse (row, token, value) triples added with atomics, so duplicated
pairs add up as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
_PROMPT_BIT = tl.constexpr(1 << 30)


@triton.jit
def _tally_kernel(ids_ptr, ids_stride, tally_ptr, V, L, IS_PROMPT: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + row.to(tl.int64) * ids_stride + offs, mask=offs < L, other=-1)
    valid = (offs < L) & (ids >= 0) & (ids < V)
    slots = tally_ptr + row.to(tl.int64) * V + ids
    if IS_PROMPT:
        tl.atomic_or(slots, tl.full([BLOCK], _PROMPT_BIT, tl.int32), mask=valid)
    else:
        tl.atomic_add(slots, tl.full([BLOCK], 1, tl.int32), mask=valid)


@triton.jit
def _penalize_kernel(logits_ptr, stride, tally_ptr, rep_ptr, presence_ptr, frequency_ptr, V,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    tally = tl.load(tally_ptr + row.to(tl.int64) * V + offs, mask=valid, other=0)
    ptrs = logits_ptr + row.to(tl.int64) * stride + offs
    x = tl.load(ptrs, mask=valid, other=0.0)
    rep = tl.load(rep_ptr + row)
    count = (tally & (_PROMPT_BIT - 1)).to(tl.float32)
    x = tl.where(tally != 0, tl.where(x > 0, x / rep, x * rep), x)
    x -= tl.load(frequency_ptr + row) * count + tl.load(presence_ptr + row) * (count > 0)
    tl.store(ptrs, x, mask=valid)


@triton.jit
def _bias_kernel(logits_ptr, stride, rows_ptr, tokens_ptr, values_ptr, N, V,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    rows = tl.load(rows_ptr + offs, mask=valid, other=0)
    tokens = tl.load(tokens_ptr + offs, mask=valid, other=0)
    values = tl.load(values_ptr + offs, mask=valid, other=0.0)
    valid &= (tokens >= 0) & (tokens < V)
    tl.atomic_add(logits_ptr + rows * stride + tokens, values, mask=valid)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a float32 [batch, vocab] tensor with contiguous rows, "
                         f"got {logits.dtype} of shape {tuple(logits.shape)}")


def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> None:
    """In place, as sampling_ref.apply_penalties."""
    _check_logits(logits)
    batch, vocab = logits.shape
    tally = torch.zeros(batch, vocab, dtype=torch.int32, device=logits.device)   # [B, V]
    for ids, is_prompt in ((prompt_ids, True), (output_ids, False)):
        ids = ids.long().contiguous()                                             # [B, L]
        if ids.shape[1] > 0:
            grid = (batch, triton.cdiv(ids.shape[1], BLOCK))
            _tally_kernel[grid](ids, ids.stride(0), tally, vocab, ids.shape[1],
                                IS_PROMPT=is_prompt, BLOCK=BLOCK)
    _penalize_kernel[(batch, triton.cdiv(vocab, BLOCK))](
        logits, logits.stride(0), tally, repetition.float().contiguous(),
        presence.float().contiguous(), frequency.float().contiguous(), vocab, BLOCK=BLOCK)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                     values: torch.Tensor) -> None:
    """In place, as sampling_ref.apply_logit_bias."""
    _check_logits(logits)
    count = rows.numel()
    if count == 0:
        return
    _bias_kernel[(triton.cdiv(count, BLOCK),)](
        logits, logits.stride(0), rows.long().contiguous(), token_ids.long().contiguous(),
        values.float().contiguous(), count, logits.shape[1], BLOCK=BLOCK)
