"""Which rows of a flat batch use which LoRA adapter slot: the record both LoRA backends read.

A step that mixes checkpoints gives each token row the slot of its adapter (or none:
the base model). The rows are grouped by slot, so that one batched product serves every
adapter of the step (Punica's SGMV, vLLM's LoRA ops): group g holds the rows of slot
`slots[g]`, in batch order, `rows[g, :lens[g]]`; the rest of `rows[g]` is padding
(row 0, never read back), so that all groups have the same length and stack into one
tensor. Groups are ordered by slot; rows without an adapter are in no group. `inverse`
goes the other way: row i's place among the groups' flattened positions, or one past them
for a row in no group (where the reference's expand keeps a zero row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NO_SLOT = -1   # a row of the base model: no adapter is added to it


@dataclass(frozen=True)
class LoraMapping:
    rows: torch.Tensor          # [G, M] int64: the rows of each group, padded with row 0
    lens: torch.Tensor          # [G] int32: rows in each group (M is the largest)
    slots: torch.Tensor         # [G] int64: each group's slot, ascending
    inverse: torch.Tensor       # [T] int64: row i's place in rows.flatten(), G * M if none
    slot_list: tuple[int, ...]  # `slots` on the host, for checks that must not sync
    num_rows: int               # rows of the flat batch, adapted or not

    @classmethod
    def from_row_slots(cls, row_slots: Sequence[int],
                       device: torch.device | str = "cpu") -> LoraMapping | None:
        """The mapping of a batch whose row i uses slot `row_slots[i]` (NO_SLOT: none);
        None if no row has an adapter."""
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if slot != NO_SLOT:
                groups.setdefault(slot, []).append(row)
        if not groups:
            return None
        slot_list = tuple(sorted(groups))
        sizes = [len(groups[s]) for s in slot_list]
        width = max(sizes)
        rows = [groups[s] + [0] * (width - len(groups[s])) for s in slot_list]
        inverse = [len(slot_list) * width] * len(row_slots)
        for g, slot in enumerate(slot_list):
            for m, row in enumerate(groups[slot]):
                inverse[row] = g * width + m
        return cls(torch.tensor(rows, dtype=torch.int64, device=device),
                   torch.tensor(sizes, dtype=torch.int32, device=device),
                   torch.tensor(slot_list, dtype=torch.int64, device=device),
                   torch.tensor(inverse, dtype=torch.int64, device=device),
                   slot_list, len(row_slots))

    @property
    def num_groups(self) -> int:
        return len(self.slot_list)

    @property
    def max_rows(self) -> int:
        return self.rows.shape[1]

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        """The groups' slots of a stack [S, ...] -> [G, ...]: a view when the groups are
        consecutive slots (the usual case: slots are handed out lowest first), else a copy."""
        first, last = self.slot_list[0], self.slot_list[-1]
        if last - first + 1 == len(self.slot_list):
            return stacked[first:last + 1]
        return stacked.index_select(0, self.slots)
