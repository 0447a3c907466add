"""State slots: which row of the linear-attention state pool each sequence owns. Pure Python.

A hybrid model (Qwen3.5) keeps, per sequence and linear-attention layer, a fixed-size
state instead of a KV cache (engine.layers.linear_attention). The runner owns those
tensors, one row per slot; this allocator only hands out row numbers. The scheduler
takes a slot when it admits a sequence, next to its first KV blocks, and gives it back
whenever it frees the blocks: at finish, abort, failure and preemption (a preempted
sequence is recomputed from scratch, into whatever slot it gets next). A sample forking
from its prompt's first sample gets a slot of its own and a copy of that sample's state.

For a model without linear attention (`num_slots=None`) sequences take no slot and the
allocator never stands in the way.
"""

from __future__ import annotations

from engine.sequence import Sequence


class StateSlotAllocator:
    def __init__(self, num_slots: int | None) -> None:
        """`num_slots`: the rows of the state pool; None: the model keeps no state."""
        self.has_state = num_slots is not None
        self.num_total_slots = num_slots or 0
        self._free = list(range(self.num_total_slots))[::-1]   # a stack, lowest slot on top

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return not self.has_state or bool(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give an admitted sequence a slot (check can_allocate first)."""
        if self.has_state:
            assert seq.state_slot is None, "the sequence already holds a state slot"
            seq.state_slot = self._free.pop()

    def fork(self, leader: Sequence, follower: Sequence) -> list[tuple[int, int]]:
        """Give a follower forking from `leader` a slot of its own (check can_allocate
        first); returns the copy (leader's slot, follower's slot) to make before the next
        step, or none for a model without state."""
        self.allocate(follower)
        return [] if follower.state_slot is None else [(leader.state_slot, follower.state_slot)]

    def free(self, seq: Sequence) -> None:
        """Take back the sequence's slot, if it holds one (safe to call twice)."""
        if seq.state_slot is not None:
            self._free.append(seq.state_slot)
            seq.state_slot = None
