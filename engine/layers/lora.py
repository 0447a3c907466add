"""The adapter slots of one module: its LoRA factors for every slot, stacked.

In a step that mixes checkpoints the base weights run unmerged and each token row adds
its own adapter's product, `y += (x @ A_k^T) @ B_k^T`, the rows grouped by slot as
`kernels.lora_mapping.LoraMapping` says (the step's record, built by the model runner
and passed down with the attention metadata). A module holds no notion of checkpoints:
only slots, filled by `engine.checkpoints.slots`.

The stacks are laid out for the kernels (kernels/lora_ref.py):
- `a` [S, in, slices * R]: each slice's A^T side by side. A fused projection (qkv,
  gate_up) has one slice per sub-module, each with its own adapter; an embedding's
  `a` is [S, vocab, R], A^T looked up by token id.
- `b` [S, R, out]: B^T with the module's scale folded in (alpha/r, rsLoRA's
  alpha/sqrt(r), or the alpha_pattern's), slice j's adapter in its own output columns
  (B^T rather than B: the expand multiplies by it, and on the CPU a batched product
  with a transposed operand is several times slower).
R is the largest rank held; smaller ranks are zero-padded, and the stacks grow (R, or a
new slice) when a larger adapter arrives, never past the slot table's maximum rank. They
are held in `dtype`, the LoRA backend's choice: float32 on the CPU, the model's on CUDA.
"""

from __future__ import annotations

import torch

from kernels import LoraOps
from kernels.lora_mapping import LoraMapping


class LoraSlots:
    def __init__(self, num_slots: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device, ops: LoraOps) -> None:
        self.num_slots, self.in_features, self.out_features = num_slots, in_features, out_features
        self.dtype, self.device, self.ops = dtype, device, ops
        self.slices: list[tuple[int, int]] = []      # output rows [start, stop), in order
        self.rank = 0
        self.a = torch.zeros(num_slots, in_features, 0, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, 0, out_features, dtype=dtype, device=device)
        self.held = [False] * num_slots              # slots whose adapter adapts this module

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def set(self, slot: int, rows: slice, lora_a: torch.Tensor, lora_b: torch.Tensor,
            scale: float) -> None:
        """Write one adapter module into `slot`: lora_a [r, in], lora_b [rows, r] (float32),
        adapting output rows `rows` (all of them for an unfused module)."""
        rank = lora_a.shape[0]
        j = self._fit((rows.start or 0, rows.stop or self.out_features), rank)
        start, stop = self.slices[j]
        cols = slice(j * self.rank, j * self.rank + rank)
        self.a[slot, :, j * self.rank:(j + 1) * self.rank] = 0
        self.a[slot, :, cols] = lora_a.T.to(self.dtype)
        self.b[slot, :, start:stop] = 0
        self.b[slot, :rank, start:stop] = (lora_b * scale).T.to(self.dtype)   # folded in float32
        self.held[slot] = True

    def clear(self, slot: int) -> None:
        """Empty `slot` (its new adapter does not adapt this module)."""
        self.a[slot] = 0
        self.b[slot] = 0
        self.held[slot] = False

    def add(self, y: torch.Tensor, x: torch.Tensor, lora: LoraMapping) -> None:
        """y [T, out] += each row's adapter product of x [T, in]."""
        if self._holds_any(lora):
            self.ops.expand(self.ops.shrink(x, self.a, lora), self.b, y, lora, self.slices)

    def add_embedding(self, y: torch.Tensor, ids: torch.Tensor, lora: LoraMapping) -> None:
        """y [T, hidden] += each row's embedding adapter row for token ids [T]."""
        if self._holds_any(lora):
            self.ops.expand(self.ops.lookup(ids, self.a, lora), self.b, y, lora, self.slices)

    def _holds_any(self, lora: LoraMapping) -> bool:
        # Most steps of a module that only some adapters adapt cost nothing for the others.
        return any(self.held[slot] for slot in lora.slot_list)

    def _fit(self, rows: tuple[int, int], rank: int) -> int:
        """The index of slice `rows`, after growing the stacks to hold it at `rank`."""
        # In order of their rows: q, k, v side by side tile the output (see lora_ref.expand).
        new_slices = sorted({*self.slices, rows})
        new_rank = max(self.rank, rank)
        if new_slices != self.slices or new_rank != self.rank:
            a = torch.zeros(self.num_slots, self.in_features, len(new_slices) * new_rank,
                            dtype=self.dtype, device=self.device)
            for j, old in enumerate(self.slices):   # each slice's columns move to its new place
                k = new_slices.index(old)
                a[:, :, k * new_rank:k * new_rank + self.rank] = (
                    self.a[:, :, j * self.rank:(j + 1) * self.rank])
            b = torch.zeros(self.num_slots, new_rank, self.out_features, dtype=self.dtype,
                            device=self.device)
            b[:, :self.rank] = self.b
            self.a, self.b, self.slices, self.rank = a, b, new_slices, new_rank
        return self.slices.index(rows)
