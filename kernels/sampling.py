"""Fused Triton sampling: temperature, top-k, top-p, min-p and the draw, without a sort.

One program per row walks the vocabulary in BLOCK-sized chunks. Every truncation keeps
an upper set of the logits (see sampling_ref.py), so it is fully described by a
threshold on the logit's *ordered key* (its float32 bits mapped to an int32 with the same
order). The kernel finds the thresholds by a 16-way search over keys, one pass over the
row per step (ideas from vLLM's pivot-based top-k/top-p kernel and FlashInfer's
sorting-free sampling):

  pass 1   row max (and argmax for greedy rows)
  top-k    largest key t with count(key >= t) >= k
  top-p    largest key t >= t_k with mass(key >= t) >= p * mass(key >= t_k)
  draw     total kept mass Z, then inverse CDF in vocabulary order for u * Z, where
           u = tl.rand(seed, step): the same Philox uniform as the reference's.

Each search pass evaluates NUM_PIVOTS pivots spread over [lo, hi) and snaps the new
bounds to keys that occur in the row, so it ends as soon as one distinct key is left
(usually after a few passes, at most about 8). With both paths drawing the same uniform
over the same truncation set, Triton and the reference return the same token except
when rounding puts u * Z within float error of a cumulative-mass boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling_search import ordered_key, scaled_weight, search_threshold

BLOCK = 512
NUM_PIVOTS = 16


@triton.jit
def _row_max(row_ptr, V, BLOCK: tl.constexpr):
    """Max logit of the row and its lowest index (0 if every logit is -inf)."""
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        chunk_max = tl.max(x, 0)
        chunk_idx = start + tl.argmax(x, 0, tie_break_left=True)
        best_idx = tl.where(chunk_max > best, chunk_idx, best_idx)
        best = tl.maximum(best, chunk_max)
    return best, best_idx


@triton.jit
def _keep_threshold(row_ptr, V, m, temp, top_k, top_p,
                    NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Ordered key t such that top-k and top-p keep exactly the tokens with key >= t."""
    lo = ordered_key(tl.full([], -float("inf"), tl.float32)).to(tl.int64)
    hi = ordered_key(m).to(tl.int64) + 1
    t_k = lo
    mass_k = 0.0                                 # mass of the top-k set, which top-p renormalises
    if (top_k > 0) & (top_k < V):
        t_k, mass_k = search_threshold(row_ptr, V, m, temp, lo, hi, top_k.to(tl.float32),
                                       False, NUM_PIVOTS, BLOCK)
    elif top_p < 1.0:
        mass_k = _kept_mass(row_ptr, V, m, temp, lo, 0.0, BLOCK)
    t = t_k
    if top_p < 1.0:
        t, _ = search_threshold(row_ptr, V, m, temp, t_k, hi, top_p * mass_k,
                                True, NUM_PIVOTS, BLOCK)
    return t


@triton.jit
def _kept_weights(row_ptr, offs, V, m, temp, t, min_p):
    """[BLOCK] weights of the chunk's tokens (0 where truncation drops them) and the keep mask."""
    x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
    w = scaled_weight(x, m, temp)
    keep = (ordered_key(x).to(tl.int64) >= t) & (x > -float("inf")) & (w >= min_p)
    return tl.where(keep & (offs < V), w, 0.0), keep & (offs < V)


@triton.jit
def _kept_mass(row_ptr, V, m, temp, t, min_p, BLOCK: tl.constexpr):
    """Total weight of the tokens kept by threshold t and min_p."""
    total = 0.0
    for start in range(0, V, BLOCK):
        w, _ = _kept_weights(row_ptr, start + tl.arange(0, BLOCK), V, m, temp, t, min_p)
        total += tl.sum(w, 0)
    return total


@triton.jit
def _draw(row_ptr, V, m, temp, t, min_p, u, argmax, BLOCK: tl.constexpr):
    """Inverse CDF in vocabulary order: first token whose cumulative kept weight > u * Z."""
    target = u * _kept_mass(row_ptr, V, m, temp, t, min_p, BLOCK)
    running = 0.0
    token = -1
    last = -1                                  # last token with weight: rounding fallback
    start = 0
    while (start < V) & (token < 0):
        offs = start + tl.arange(0, BLOCK)
        w, _ = _kept_weights(row_ptr, offs, V, m, temp, t, min_p)
        cum = running + tl.cumsum(w, 0)       # [BLOCK]
        first = tl.min(tl.where(cum > target, offs, V), 0)
        token = tl.where(first < V, first, token)
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs, -1), 0))
        running += tl.sum(w, 0)
        start += BLOCK
    return tl.where(token >= 0, token, tl.where(last >= 0, last, argmax))


@triton.jit
def _sample_kernel(logits_ptr, stride, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
                   step_ptr, out_ptr, mask_ptr, V, WRITE_MASK: tl.constexpr,
                   NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    temp = tl.load(temp_ptr + row)
    m, argmax = _row_max(row_ptr, V, BLOCK)
    if temp > 0:
        m = tl.where(m == -float("inf"), 0.0, m)   # no finite logit: every weight is 0
        t = _keep_threshold(row_ptr, V, m, temp, tl.load(top_k_ptr + row),
                            tl.load(top_p_ptr + row), NUM_PIVOTS, BLOCK)
        min_p = tl.load(min_p_ptr + row)
        if WRITE_MASK:
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                _, keep = _kept_weights(row_ptr, offs, V, m, temp, t, min_p)
                tl.store(mask_ptr + row.to(tl.int64) * V + offs, keep.to(tl.int8), mask=offs < V)
        else:
            u = tl.rand(tl.load(seed_ptr + row), tl.load(step_ptr + row))
            tl.store(out_ptr + row, _draw(row_ptr, V, m, temp, t, min_p, u, argmax, BLOCK))
    else:
        if WRITE_MASK:
            tl.store(mask_ptr + row.to(tl.int64) * V + argmax, 1)
        else:
            tl.store(out_ptr + row, argmax)


def _launch(logits, temperature, top_k, top_p, min_p, seeds, steps, write_mask: bool):
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a [batch, vocab] tensor with contiguous rows, "
                         f"got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    mask = torch.zeros(batch if write_mask else 1, vocab, dtype=torch.int8, device=logits.device)
    params = [temperature.float(), top_k.int(), top_p.float(), min_p.float(),
              seeds.long(), steps.long()]
    _sample_kernel[(batch,)](logits, logits.stride(0), *[p.contiguous() for p in params], out,
                             mask, vocab, WRITE_MASK=write_mask, NUM_PIVOTS=NUM_PIVOTS,
                             BLOCK=BLOCK, num_warps=8)
    return mask.bool() if write_mask else out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """int64 [B]: one token per row, as sampling_ref.sample defines it."""
    return _launch(logits, temperature, top_k, top_p, min_p, seeds, steps, write_mask=False)


def truncation_mask(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """bool [B, V]: the tokens the kernel may draw (for tests against the reference)."""
    zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return _launch(logits, temperature, top_k, top_p, min_p, zeros, zeros, write_mask=True)
