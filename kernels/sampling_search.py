"""Threshold search over ordered keys: the building block of the sort-free sampler.

A truncation that keeps an upper set of the logits is a threshold t on ordered keys
(keep key >= t). `search_threshold` finds the largest t whose upper set still reaches a
target count (top-k) or probability mass (top-p) with NUM_PIVOTS pivots per pass over
the row, instead of sorting it.
"""

from __future__ import annotations

import triton
import triton.language as tl

_KEY_MAX = tl.constexpr(2**40)     # above any int32 key: identity of min over keys
_KEY_MIN = tl.constexpr(-(2**40))  # below any int32 key: identity of max over keys


@triton.jit
def ordered_key(x):
    """int32 with the order of the float32 x (+0.0 and -0.0 share key 0; -inf is lowest)."""
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats order backwards by their bits: flipping all but the sign bit fixes that.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def scaled_weight(x, m, temp):
    """exp((x - max) / T): the unnormalised probability, 1 for the most likely token."""
    return tl.exp((x - m) / temp)


@triton.jit
def upper_set_stats(row_ptr, V, m, temp, piv, hi, BLOCK: tl.constexpr):
    """One pass over the row, per pivot p (piv: [P] int64 keys):

    count and mass of the tokens with key >= p, the smallest such key, and the largest key
    below p; plus the largest key below `hi`.
    """
    count = tl.zeros(piv.shape, tl.int32)
    mass = tl.zeros(piv.shape, tl.float32)
    min_ge = tl.full(piv.shape, _KEY_MAX, tl.int64)
    max_below = tl.full(piv.shape, _KEY_MIN, tl.int64)
    max_below_hi = tl.full([], _KEY_MIN, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
        key = ordered_key(x).to(tl.int64)                       # [BLOCK]
        w = scaled_weight(x, m, temp)                           # [BLOCK]
        ge = key[:, None] >= piv[None, :]                       # [BLOCK, P]
        below = valid[:, None] & ~ge
        ge = ge & valid[:, None]
        count += tl.sum(ge.to(tl.int32), 0)
        mass += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
        min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, key[:, None], _KEY_MAX), 0))
        max_below = tl.maximum(max_below, tl.max(tl.where(below, key[:, None], _KEY_MIN), 0))
        under_hi = tl.where(valid & (key < hi), key, _KEY_MIN)
        max_below_hi = tl.maximum(max_below_hi, tl.max(under_hi, 0))
    return count, mass, min_ge, max_below, max_below_hi


@triton.jit
def search_threshold(row_ptr, V, m, temp, lo, hi, target, BY_MASS: tl.constexpr,
                     NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest key t in [lo, hi) whose upper set has count (or mass, if BY_MASS) >= target.

    Requires that key lo reaches the target and key hi does not. Returns t and the mass of
    its upper set (0.0 if no pass was needed). Each pass keeps the pivot interval that holds
    t, then snaps its ends to keys present in the row, so the search stops once the interval
    holds a single distinct key.
    """
    j = tl.arange(0, NUM_PIVOTS)
    lo_mass = 0.0
    while hi - lo > 1:
        piv = lo + ((hi - lo) * j.to(tl.int64)) // NUM_PIVOTS   # [P], piv[0] == lo
        count, mass, min_ge, max_below, max_below_hi = upper_set_stats(
            row_ptr, V, m, temp, piv, hi, BLOCK)
        if BY_MASS:
            stat = mass
        else:
            stat = count.to(tl.float32)
        # The last pivot that still reaches the target; piv[0] does by the invariant (a
        # recomputed mass may round just below it, hence the clamp).
        best = tl.maximum(tl.max(tl.where(stat >= target, j, -1), 0), 0)
        lo_mass = tl.sum(tl.where(j == best, mass, 0.0), 0)
        lo = tl.max(tl.where(j == best, min_ge, _KEY_MIN), 0)
        next_below = tl.max(tl.where(j == best + 1, max_below, _KEY_MIN), 0)
        hi = tl.where(best + 1 < NUM_PIVOTS, next_below, max_below_hi) + 1
    return lo, lo_mass
