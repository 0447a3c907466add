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
`PackedWeight` is that rule, for this layer and for the experts of engine.layers.moe.

In a step that mixes checkpoints the layer adds each row's own adapter to the base
product (`lora`, the step's rows by adapter slot; the factors are `lora_slots`, see
engine.layers.lora). In every other step the weight already holds what is served.

In the batch-invariant mode (engine.layers.batch_invariant) the product runs on at least
two rows, or over fixed tiles of rows where oneDNN's product of this shape was not
row-invariant at `enable`; that mode serves checkpoints merged (engine.config), so no
step of it mixes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.batch_invariant import Product, cuda_matmul, invariant_rows
from engine.layers.lora import LoraSlots
from kernels.lora_mapping import LoraMapping

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether a product with input x runs on oneDNN (CPU, float32 or bfloat16)."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, with `weight` packed by `PackedWeight` (or a dense [out, in])."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedWeight:
    """oneDNN's packed copy of a weight [out, in], or of each matrix of a stack of them
    [E, out, in] (one per expert), remade when the weight changes."""

    def __init__(self) -> None:
        self._packed: torch.Tensor | list[torch.Tensor] | None = None
        self._packed_from: tuple[weakref.ref, int] | None = None    # (weight, its version)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if weight.is_inference():      # no version counter to watch: use it as it is
            return weight if weight.dim() == 2 else list(weight)
        ref, version = self._packed_from or (None, -1)
        if ref is None or ref() is not weight or version != weight._version:
            pack = torch.ops.mkldnn._reorder_linear_weight
            dense = weight.detach()
            self._packed = pack(dense) if dense.dim() == 2 else [pack(w) for w in dense]
            self._packed_from = (weakref.ref(weight), weight._version)
        return self._packed


class Linear(nn.Linear):
    _packed: PackedWeight | None = None     # made at the first product on oneDNN
    lora_slots: LoraSlots | None = None     # made when an adapter in a slot adapts this layer
    batch_invariant = False                 # set by engine.layers.batch_invariant.enable
    tiled = True                            # the mode's CPU products in tiles (ditto)

    def forward(self, x: torch.Tensor, lora: LoraMapping | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out]; `lora`: the step's rows by adapter slot, if it mixes."""
        y = self._base_product(x)
        if lora is not None and self.lora_slots is not None:
            self.lora_slots.add(y, x, lora)
        return y

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_invariant:
            return self._product(x)
        if x.is_cuda:
            return cuda_matmul(x, self.weight, self.bias)
        return invariant_rows(self._product, x, self.tiled)

    def products(self) -> list[tuple[Product, torch.Tensor, bool]]:
        """The layer's product, its weight and whether it adds a bias, for the mode's probe."""
        return [(self._product, self.weight, self.bias is not None)]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if uses_onednn(x):
            if self._packed is None:
                self._packed = PackedWeight()
            return onednn_linear(x, self._packed(self.weight), self.bias)
        return F.linear(x, self.weight, self.bias)
