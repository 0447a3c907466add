"""RMSNorm and its Qwen3.5 variants, computed in float32 as transformers does, then cast back.

- `RMSNorm`: Llama's, `weight * normed(x)` (the product in the input's dtype).
- `ZeroCenteredRMSNorm`: Qwen3.5's, `normed(x) * (1 + weight)`, the product in float32
  (its weights are stored around 0, so a zero weight is the identity).
- `GatedRMSNorm`: the output norm of Qwen3.5's linear attention, `weight * normed(x)`
  gated by `silu(z)` in float32.
- `l2_normalize`: the q/k normalisation of linear attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _normed(x, self.eps).to(x.dtype)


class ZeroCenteredRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_normed(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: [..., dim] -> weight * normed(x) * silu(z), in x's dtype."""
        normed = self.weight * _normed(x, self.eps).to(x.dtype)
        return (normed * F.silu(z.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| over the last dimension, in float32 (the eps inside the root, as FLA has it)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)
