"""The input embedding, with the adapter slots of steps that mix checkpoints.

An embedding adapter's A is [r, vocab] and B [hidden, r]; its delta for token t is the
row `A[:, t] @ B^T`, so the unmerged path looks up A^T's row by token id and expands it
as a linear adapter does (engine.layers.lora).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.lora import LoraSlots
from kernels.lora_mapping import LoraMapping


class Embedding(nn.Embedding):
    lora_slots: LoraSlots | None = None     # made when an adapter in a slot adapts it

    def forward(self, ids: torch.Tensor, lora: LoraMapping | None = None) -> torch.Tensor:
        """ids: [T] -> [T, hidden]; `lora`: the step's rows by adapter slot, if it mixes."""
        y = F.embedding(ids, self.weight)
        if lora is not None and self.lora_slots is not None:
            self.lora_slots.add_embedding(y, ids, lora)
        return y
