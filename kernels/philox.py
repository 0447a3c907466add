"""Triton's counter-based random numbers (`tl.rand`), reproduced bit for bit in PyTorch.

The sampler draws one uniform per row from Philox-4x32-10 keyed by (seed, step): the
Triton kernel calls `tl.rand(seed, step)`, and the reference calls `philox_uniform(seeds,
steps)`, which performs the same integer rounds and the same int -> float conversion, so
both paths see the identical float32 for every row. A row's uniform depends only on its
own seed and step: never on the batch it sits in.

PyTorch has no unsigned 32-bit multiply-high, so the rounds run on int64 tensors holding
values in [0, 2**32), and `_mul_hi_lo` splits one factor into 16-bit halves so that no
intermediate product exceeds 2**49 (exact in int64, no reliance on overflow).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants, as in triton/language/random.py (and the Philox paper).
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10
# tl.rand's int32 -> [0, 1) scale: the largest value with (2**31 - 1) * scale < 1 in float32.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product const * x (both in [0, 2**32))."""
    prod_lo = x * (const & 0xFFFF)                      # < 2**48
    prod_hi = x * (const >> 16)                         # < 2**48, weight 2**16
    mid = prod_lo + ((prod_hi & 0xFFFF) << 16)          # < 2**49
    return (prod_hi >> 16) + (mid >> 32), mid & _MASK32


def philox_uint32(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 for key `seeds` and counter `counters` (int64).

    Matches Triton's `randint(seed, offset)` with a 64-bit offset: the counter's low and high
    halves are the first two counter words, the seed's halves are the key. Returns int64
    tensors holding unsigned 32-bit values.
    """
    seeds, counters = torch.broadcast_tensors(seeds.long(), counters.long())
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), equal bit for bit to Triton's `tl.rand(seed, counter)`."""
    bits = philox_uint32(seeds, counters)
    # Reinterpret as int32, then fold negatives onto [0, 2**31) as tl.rand does (x < 0 -> ~x).
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=folded.device)
    return folded.to(torch.float32) * scale
