"""The adapter slots: which adapters the model's stacked LoRA factors hold, for steps that
mix checkpoints.

A step that serves several checkpoints at once runs the base weights unmerged and adds
each row's own adapter (engine.layers.lora). Every adapted module holds the factors of
up to `num_slots` adapters, stacked; an adapter takes one slot in every module it adapts.
`assign` gives each adapter of a step a slot: the one it already holds, else a free one
(lowest first, so that a step's slots are usually consecutive and the stacks are read
in place), else that of the least recently used adapter the step does not need. Loading
folds the scale into B in float32 and casts the factors to the stacks' dtype (the LoRA
backend's `factor_dtype`, else the model's), and empties the modules the slot's previous
adapter adapted and the new one does not.

Adapters are known by their `AdapterKey` (directory, inode, mtime, size), so a
checkpoint rewritten on disk is a new adapter and takes a slot of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from engine.checkpoints.adapter import AdapterKey, LoraAdapter
from engine.layers.embedding import Embedding
from engine.layers.lora import LoraSlots
from kernels import LoraOps


class AdapterSlots:
    def __init__(self, model: nn.Module, num_slots: int, ops: LoraOps) -> None:
        self.model, self.num_slots, self.ops = model, num_slots, ops
        self._slots: OrderedDict[AdapterKey, int] = OrderedDict()   # least recently used first
        self._written: dict[int, list[LoraSlots]] = {}   # slot -> the stacks its adapter fills

    @property
    def resident(self) -> list[AdapterKey]:
        """The adapters in slots, least recently used first."""
        return list(self._slots)

    @property
    def nbytes(self) -> int:
        """Memory held by every module's stacked factors (on the model's device)."""
        stacks = {id(s): s for written in self._written.values() for s in written}
        return sum(s.nbytes for s in stacks.values())

    def slot_of(self, key: AdapterKey) -> int | None:
        return self._slots.get(key)

    def assign(self, keys: list[AdapterKey],
               load: Callable[[AdapterKey], LoraAdapter]) -> dict[AdapterKey, int]:
        """A slot for each of a step's adapters, loading (`load(key)`) those not held yet
        (never 3-D expert factors: those are served merged)."""
        if len(keys) > self.num_slots:
            raise ValueError(f"{len(keys)} adapters in one step, but only {self.num_slots} slots")
        for key in keys:
            if key in self._slots:
                self._slots.move_to_end(key)
        for key in keys:
            if key not in self._slots:
                slot = self._free_slot(keys)
                self._load(slot, load(key))
                self._slots[key] = slot
        return {key: self._slots[key] for key in keys}

    def _free_slot(self, needed: list[AdapterKey]) -> int:
        taken = set(self._slots.values())
        free = [slot for slot in range(self.num_slots) if slot not in taken]
        if free:
            return free[0]
        victim = next(key for key in self._slots if key not in needed)   # least recently used
        return self._slots.pop(victim)

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        for stacks in self._written.pop(slot, []):
            stacks.clear(slot)
        written = self._written[slot] = []
        for module in adapter.modules:
            stacks, rows = self._stacks(module.module)
            stacks.set(slot, rows, module.lora_a, module.lora_b, module.scale)
            written.append(stacks)

    def _stacks(self, hf_module: str) -> tuple[LoraSlots, slice]:
        """The slots of the layer an adapter module adapts, and the output rows it writes
        (its part of a fused projection); made at the first adapter that adapts it."""
        name, rows = self.model.param_slice(hf_module + ".weight")
        layer = self.model.get_submodule(name.removesuffix(".weight"))
        if layer.lora_slots is None:
            weight = layer.weight
            in_features, out_features = ((layer.num_embeddings, layer.embedding_dim)
                                         if isinstance(layer, Embedding)
                                         else (layer.in_features, layer.out_features))
            layer.lora_slots = LoraSlots(self.num_slots, in_features, out_features,
                                         self.ops.factor_dtype or weight.dtype, weight.device,
                                         self.ops)
        return layer.lora_slots, rows if rows is not None else slice(None)
