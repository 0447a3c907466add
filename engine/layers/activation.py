"""SiLU, sigmoid and softplus, and in the batch-invariant mode forms whose bits do not
depend on where an element sits in its tensor.

PyTorch's CPU kernels run an elementwise op in vector lanes and finish the tensor's last
few elements (fewer than two vectors) in a scalar loop. For float32 sigmoid, SiLU and
softplus the two loops round differently (4%, 4% and 9% of random inputs on this
project's AMD EPYC: scripts/measure_numerics.py, BENCHMARKS.md), so a token's activation
could change with the number of tokens sharing its tensor (a [T, 4] gate, a [T, 1]
shared-expert gate). Written with exp, log1p and a division, whose two loops agree bit
for bit, they do not: that is what `batch_invariant=True` computes, in float32 whatever
the input's dtype, rounded once to it as PyTorch's half-precision kernels do. Otherwise
these are PyTorch's own, as transformers computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this softplus(x) == x in float32 (PyTorch's default threshold).
_SOFTPLUS_THRESHOLD = 20.0


def sigmoid(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    if not batch_invariant:
        return torch.sigmoid(x)
    return (1.0 / (1.0 + torch.exp(-x.float()))).to(x.dtype)


def silu(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """x * sigmoid(x)."""
    if not batch_invariant:
        return F.silu(x)
    x32 = x.float()
    return (x32 / (1.0 + torch.exp(-x32))).to(x.dtype)


def softplus(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """log(1 + exp(x)), and x itself above the threshold (where exp would overflow)."""
    if not batch_invariant:
        return F.softplus(x)
    x32 = x.float()
    return torch.where(x32 > _SOFTPLUS_THRESHOLD, x32, torch.log1p(torch.exp(x32))).to(x.dtype)
