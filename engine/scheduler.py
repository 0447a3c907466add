"""Continuous batching with chunked prefill and recompute preemption. Pure Python.

Every step the scheduler hands each chosen sequence a number of new tokens to run:
one for a decode, up to the whole remaining prompt for a prefill, cut to fit the
step's token budget (that cut is chunked prefill: a long prompt no longer stalls the
decodes that run beside it). Running sequences come first, oldest first; waiting
ones join while the sequence and token budgets and the free blocks allow (and, for a
model with linear-attention layers, a free state slot: engine.state_slots).

When the cache is full, the youngest running sequence is preempted: its blocks (and
state slot) are freed and it goes back to the front of the queue, to be recomputed later. Nothing is
ever dropped.

All sequences of one step share one checkpoint (its LoRA is merged into the weights).
The scheduler stays on a checkpoint while it has work, and moves to the oldest
waiting work of another one after `max_steps_per_checkpoint` steps, so none starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.state_slots import StateSlotAllocator


@dataclass
class ScheduledBatch:
    checkpoint: Path | None
    seqs: list[Sequence]
    num_new_tokens: list[int]            # per sequence, same order


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_steps_per_checkpoint: int = 16,
                 state_slots: StateSlotAllocator | None = None) -> None:
        self.bm = block_manager
        self.state_slots = state_slots or StateSlotAllocator(None)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_steps_per_checkpoint = max_steps_per_checkpoint
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # oldest first
        self.checkpoint: Path | None = None
        self.steps_on_checkpoint = 0
        self.step_count = 0
        self.last_served: dict[Path | None, int] = {}
        self.preempted_this_step = False
        self.num_preemptions = 0                # since start, for stats and tests
        self.num_prefix_cached_tokens = 0       # since start: prompt tokens served from the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        if not self.has_work():
            return None
        self._pick_checkpoint()
        self.preempted_this_step = False
        seqs, counts = [], []
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.checkpoint != self.checkpoint or seq.status is not SequenceStatus.RUNNING:
                continue
            if budget == 0 or len(seqs) == self.max_num_seqs:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, n):
                continue  # seq itself was preempted
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self._admit_waiting(seqs, counts, budget)
        if not seqs:
            return None
        self.steps_on_checkpoint += 1
        self.step_count += 1
        return ScheduledBatch(self.checkpoint, seqs, counts)

    def _admit_waiting(self, seqs: list[Sequence], counts: list[int], budget: int) -> None:
        if self.preempted_this_step:
            return  # the cache is under pressure: let the running sequences drain first
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(seqs) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.checkpoint != self.checkpoint:
                skipped.append(seq)
                continue
            cached = self.bm.allocate_cached_prefix(seq)
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            self.num_prefix_cached_tokens += cached
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room_to_admit(seq, n, nothing_scheduled=not seqs):
                self.bm.free_blocks(seq)
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            self.bm.append_slots(seq, n)
            self.state_slots.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _make_room(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Preempt the youngest running sequences until `seq` fits; False if seq was the one."""
        while not self.bm.can_append(seq, num_new_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.bm.append_slots(seq, num_new_tokens)
        return True

    def _make_room_to_admit(self, seq: Sequence, num_new_tokens: int, nothing_scheduled: bool) -> bool:
        """A new sequence waits for running ones to finish, unless this step would do
        nothing at all: then paused sequences of other checkpoints give way."""
        while not (self.bm.can_append(seq, num_new_tokens) and self.state_slots.can_allocate()):
            if not nothing_scheduled or not self.running:
                return False
            self.preempt(self.running[-1])
        return True

    def preempt(self, seq: Sequence) -> None:
        self.preempted_this_step = True
        self.num_preemptions += 1
        self.running.remove(seq)
        self.bm.free_blocks(seq)
        self.state_slots.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Finished or aborted: free its blocks and state slot at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_blocks(seq)
        self.state_slots.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _pick_checkpoint(self) -> None:
        pending = [*self.running, *self.waiting]
        has_current = any(s.checkpoint == self.checkpoint for s in pending)
        if has_current and self.steps_on_checkpoint < self.max_steps_per_checkpoint:
            return
        others = [s for s in pending if s.checkpoint != self.checkpoint]
        if others:
            # Round robin: the checkpoint served least recently (never: by oldest request).
            nxt = min(others, key=lambda s: (self.last_served.get(s.checkpoint, -1), s.arrival))
            self.last_served[self.checkpoint] = self.step_count
            self.checkpoint = nxt.checkpoint
        self.steps_on_checkpoint = 0
