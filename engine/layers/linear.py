"""nn.Linear whose float32 products run on oneDNN when on the CPU.

PyTorch hands float32 matmuls on the CPU to MKL, which on AMD processors takes a slower
generic code path; oneDNN, which PyTorch already uses for bfloat16, runs the same float32
products at float32 accuracy 1.7x to 2.2x faster on this project's AMD EPYC machine, at
every batch size from 1 to 512 rows (BENCHMARKS.md). `mkldnn._linear_pointwise` is the op
PyTorch's own compiler emits for CPU linear layers; without it, F.linear serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
