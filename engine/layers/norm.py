"""RMSNorm, computed in float32 as transformers does, then cast back.

Families differ in where the cast back happens: Llama casts the normalized input back to
the model's dtype and then multiplies by the weight (two roundings in half precision);
gpt-oss multiplies in float32 and casts the product (one rounding).
"""

from __future__ import annotations

import torch
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
