"""nn.Linear whose products run on oneDNN with a prepacked weight when on the CPU.

Two reasons, both measured on this project's AMD EPYC machine (BENCHMARKS.md):
- PyTorch hands float32 matmuls on the CPU to MKL, which on AMD processors takes a slower
  generic code path; oneDNN, PyTorch's bfloat16 path, runs them 1.7x to 2.2x faster at
  float32 accuracy.
- oneDNN is faster again with the weight reordered once into its blocked layout instead
  of on every call: 3x for one row in bfloat16, 1.4x for 64 rows.
`mkldnn._linear_pointwise` and `_reorder_linear_weight` are the ops torch.compile emits
for CPU linear layers. The packed copy costs a second copy of the weights in host memory;
the dense weight stays the one that loading and LoRA merges write, and a change to it (a
new tensor, or its version counter moved) repacks it before the next product.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    _packed: torch.Tensor | None = None
    _packed_from: tuple[weakref.ref, int] | None = None     # (weight, its version) when packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.mkldnn._linear_pointwise(x, self._onednn_weight(), self.bias,
                                                      "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _onednn_weight(self) -> torch.Tensor:
        if self.weight.is_inference():      # no version counter to watch: use it as it is
            return self.weight
        ref, version = self._packed_from or (None, -1)
        if ref is None or ref() is not self.weight or version != self.weight._version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._packed_from = (weakref.ref(self.weight), self.weight._version)
        return self._packed
