"""How each step serves its checkpoints: one merged into the weights, or several in slots.

The rule, in mode "auto" (the default):
- a step whose sequences all use one checkpoint (the base model is one) runs *merged*:
  its adapter is merged into the live weights (engine.checkpoints.merge), no per-token
  LoRA work at all;
- a step that mixes checkpoints runs *unmerged*: the base weights are restored (exactly:
  merges always start from an exact base copy, so A -> mixed -> A is bit-identical) and
  each adapter of the step takes a slot (engine.checkpoints.slots), whose factors every
  adapted layer adds to its rows.
Mode "merged" never mixes (the scheduler then gives each step one checkpoint, in turns);
mode "unmerged" serves every step from slots, one checkpoint or several: each is one
path on its own, for callers that need one numerics for every batch. Adapters of MoE
experts are always served merged, one checkpoint per step (a slot holds 2-D factors).

Switching modes costs a restore or a merge (and, on the CPU, repacking the changed
weights), so the scheduler keeps steps mixed while several checkpoints have work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from engine.checkpoints.adapter import MISSING, AdapterKey, LoraAdapter, adapter_key
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.checkpoints.slots import AdapterSlots
from engine.config import LORA_MODES
from kernels import LoraOps
from kernels.lora_mapping import NO_SLOT

_MEMO_SIZE = 4096   # adapters whose mixability is remembered


@dataclass
class LoraPlan:
    """How a step runs: `slots` maps each checkpoint to its slot (NO_SLOT: the base), or is
    None when the step runs merged; `failed` holds the checkpoints that cannot be served,
    with why (their sequences fail; the rest of the step runs)."""

    slots: dict[Path | None, int] | None
    failed: dict[Path | None, Exception] = field(default_factory=dict)


class LoraServing:
    def __init__(self, model: nn.Module, merger: LoraManager, num_slots: int, ops: LoraOps,
                 mode: str = "auto") -> None:
        if mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {mode!r}")
        self.model, self.merger, self.mode = model, merger, mode
        self.can_mix = mode != "merged"
        self.slots = AdapterSlots(model, num_slots, ops)
        self._mixable: dict[AdapterKey, bool] = {}

    def mixable(self, checkpoint: Path | None) -> bool:
        """Whether `checkpoint` may share a step with others (asked by the scheduler)."""
        if not self.can_mix or checkpoint is None:
            return self.can_mix
        key = adapter_key(checkpoint)
        if key not in self._mixable:
            try:
                mixable = self._unmixable(self.merger.load(key)) is None
            except CheckpointInvalid:
                return True   # its step fails its requests with the reason (prepare)
            if len(self._mixable) >= _MEMO_SIZE:
                self._mixable.clear()
            self._mixable[key] = mixable
        return self._mixable[key]

    def prepare(self, checkpoints: list[Path | None]) -> LoraPlan:
        """Make the model ready for a step over `checkpoints` (distinct; the scheduler keeps
        them within the slots, and a checkpoint that cannot mix alone)."""
        if self._runs_merged(checkpoints):
            try:
                self.merger.activate(checkpoints[0])
            except CheckpointInvalid as exc:
                return LoraPlan(None, {checkpoints[0]: exc})
            return LoraPlan(None)
        self.merger.activate(None)
        keys, loaded, failed = {}, {}, {}
        for checkpoint in checkpoints:
            if checkpoint is None:
                continue
            try:
                keys[checkpoint] = key = self._key(checkpoint)
                if self.slots.slot_of(key) is None:
                    loaded[key] = self._loadable(key)
            except CheckpointInvalid as exc:
                failed[checkpoint] = exc
                keys.pop(checkpoint, None)
        held = self.slots.assign(list(keys.values()), loaded.__getitem__)
        slots = {checkpoint: held[key] for checkpoint, key in keys.items()}
        return LoraPlan({**slots, None: NO_SLOT}, failed)

    def _runs_merged(self, checkpoints: list[Path | None]) -> bool:
        if not self.can_mix:
            return True
        if len(checkpoints) != 1:
            return False
        return self.mode == "auto" or not self.mixable(checkpoints[0])

    def _key(self, checkpoint: Path) -> AdapterKey:
        """Its adapter key; for a checkpoint deleted while in a slot, the slot's adapter
        (its requests finish on what they started with)."""
        key = adapter_key(checkpoint)
        if key[1:] == MISSING:
            held = [k for k in self.slots.resident if k[0] == key[0]]
            return held[-1] if held else key
        return key

    def _loadable(self, key: AdapterKey) -> LoraAdapter:
        adapter = self.merger.load(key)
        if (why := self._unmixable(adapter)) is not None:
            raise CheckpointInvalid(f"Checkpoint `{key[0].name}` {why}: it is served merged, "
                                    "never in a step with other checkpoints")
        return adapter

    def _unmixable(self, adapter: LoraAdapter) -> str | None:
        """Why `adapter` cannot take a slot (None: it can): a slot holds 2-D factors."""
        return "adapts MoE experts" if adapter.adapts_experts else None
