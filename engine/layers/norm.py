"""RMSNorm and its variants, computed in float32 as transformers does, then cast back.

Families differ in where the cast back happens: Llama casts the normalized input back to
the model's dtype and then multiplies by the weight (two roundings in half precision);
gpt-oss multiplies in float32 and casts the product (one rounding). Qwen3.5 has two more:
- `ZeroCenteredRMSNorm`: `normed(x) * (1 + weight)` in float32 (its weights are stored
  around 0, so a zero weight is the identity);
- `GatedRMSNorm`, the output norm of its linear attention: Llama's, then gated by
  `silu(z)` in float32;
and `l2_normalize` is the q/k normalisation of linear attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self._normalized(x).to(x.dtype)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), in float32."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Float32WeightRMSNorm(RMSNorm):
    """gpt-oss's RMSNorm: the weight applies in float32, before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * self._normalized(x)).to(x.dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: [..., dim] -> weight * normed(x) * silu(z), in x's dtype."""
        return (super().forward(x) * F.silu(z.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| over the last dimension, in float32 (the eps inside the root, as FLA has it)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)
