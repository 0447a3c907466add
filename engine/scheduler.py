"""Continuous batching with chunked prefill and recompute preemption. Pure Python.

Every step the scheduler hands each chosen sequence a number of new tokens to run:
one for a decode, up to the whole remaining prompt for a prefill, cut to fit the
step's token budget (that cut is chunked prefill: a long prompt no longer stalls the
decodes that run beside it). Running sequences come first, oldest first; waiting
ones join while the sequence and token budgets and the free blocks allow (and, for a
model with linear-attention layers, a free state slot: engine.state_slots).

When the cache is full, the youngest running sequence is preempted: its blocks (and
state slot) are freed and it goes back to the front of the queue, to be recomputed
later. Nothing is ever dropped.

For a hybrid model, a cached prefix is only of use with the linear-attention state
that its last block left (engine.state_snapshots): where prefills stop so that states
are kept, which are kept, and which prompt waits for one, is engine.state_keeper's rule.
A prompt that finds a kept prefix cached starts from a copy of its state.

A prompt is computed once: the samples of one prompt follow their first sample and
fork from it when its prefill ends (its first token is sampled for each of them from
the same logits, each with its own seed), and a waiting prompt whose next block
another sequence is computing right now waits a step to take it from the prefix cache.

Sequences of different checkpoints share a step, up to `max_loras` distinct adapters;
which checkpoints a step may serve, and the turns among them when more wait, is
engine.checkpoint_turns's rule.

After each step, `update` advances the sequences: it is the only writer of their
progress, and it ends those that a token ends (EOS, a stop token, the length limit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engine.block_manager import BlockManager
from engine.checkpoint_turns import Checkpoint, CheckpointTurns, always
from engine.outputs import SeqStepResult, TopLogprobs
from engine.sequence import Sequence, SequenceStatus
from engine.state_keeper import StateKeeper
from engine.state_slots import StateSlotAllocator
from engine.state_snapshots import StateSnapshots


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]            # per sequence, same order
    # KV blocks to copy (source, destination) before the step: forks' partial blocks.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # State rows to copy (source, destination) before the step, in order: forks' states,
    # states kept at a block boundary, kept states a prefix-cache hit resumes from.
    state_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The distinct checkpoints of the step's sequences (None: the base model)."""
        return list(dict.fromkeys(seq.checkpoint for seq in self.seqs))

    def without(self, dropped: set[Sequence]) -> ScheduledBatch:
        """The batch less `dropped` (sequences failed before the step ran)."""
        kept = [i for i, seq in enumerate(self.seqs) if seq not in dropped]
        return replace(self, seqs=[self.seqs[i] for i in kept],
                       num_new_tokens=[self.num_new_tokens[i] for i in kept])


@dataclass
class SequenceUpdate:
    """A sequence that got a token in the last step, and whether that token ended it."""

    seq: Sequence
    result: SeqStepResult
    finish_reason: str | None = None     # "stop" (EOS or a stop token) | "length" | None
    stop_token: int | None = None        # the stop token that matched (not EOS)
    # The prompt's logprobs, with the sequence's first token (when asked for).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_steps_per_checkpoint: int = 16,
                 eos_token_ids: tuple[int, ...] = (), max_model_len: int | None = None,
                 max_loras: int = 16, mixable: Callable[[Checkpoint], bool] = always,
                 state_slots: StateSlotAllocator | None = None,
                 state_snapshots: StateSnapshots | None = None) -> None:
        self.bm = block_manager
        self.state_slots = state_slots or StateSlotAllocator(None)
        self.keeper = (StateKeeper(state_snapshots, block_manager)
                       if state_snapshots is not None else None)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.turns = CheckpointTurns(max_loras, max_steps_per_checkpoint, mixable)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # oldest first
        self.step_count = 0
        self.preempted_this_step = False
        self._pending_copies: list[tuple[int, int]] = []
        self._pending_state_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0                # since start, for stats and tests
        self.num_prefix_cached_tokens = 0       # since start: prompt tokens served from the cache
        self.num_computed_prompt_tokens = 0     # since start: prompt positions run through the model

    def add(self, seq: Sequence, followers: list[Sequence] = ()) -> None:
        """Queue `seq`; `followers` (other samples of the same prompt) fork from it."""
        self._lead(seq, followers)
        self.waiting.append(seq)

    @staticmethod
    def _lead(leader: Sequence, followers: list[Sequence]) -> None:
        leader.followers = list(followers)
        for follower in followers:
            follower.leader = leader

    @staticmethod
    def force(seq: Sequence, token_ids: list[int]) -> None:
        """Make `token_ids` the next tokens of `seq`, chosen instead of sampled."""
        seq.forced_ids.extend(token_ids)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences not yet in the cache, followers waiting for their leader included."""
        return sum(1 + len(s.followers) for s in self.waiting) + sum(
            len(s.followers) for s in self.running)

    def schedule(self) -> ScheduledBatch | None:
        if not self.has_work():
            return None
        serving = self.turns.pick((*self.running, *self.waiting), self.step_count)
        self.preempted_this_step = False
        seqs, counts = [], []
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.checkpoint not in serving or seq.status is not SequenceStatus.RUNNING:
                continue
            if budget == 0 or len(seqs) == self.max_num_seqs:
                break
            n = self._num_new_tokens(seq, budget)
            if not self._make_room(seq, n):
                continue  # seq itself was preempted
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self._admit_waiting(seqs, counts, budget, serving)
        if not seqs:
            return None
        self.turns.stepped()
        self.step_count += 1
        copies, self._pending_copies = self._pending_copies, []
        state_copies, self._pending_state_copies = self._pending_state_copies, []
        return ScheduledBatch(seqs, counts, copies, state_copies)

    def update(self, batch: ScheduledBatch,
               results: dict[Sequence, SeqStepResult]) -> list[SequenceUpdate]:
        """Advance the batch's sequences by what the step computed; fork the followers of
        prefills that ended; finish the sequences that a token ends. One update per
        sequence that got a token, leaders before their followers."""
        updates = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.num_computed_prompt_tokens += max(0, min(seq.num_computed_tokens,
                                                          seq.num_prompt_tokens) - before)
            self.bm.cache_full_blocks(seq, before)
            copy = self.keeper.keep(seq) if self.keeper is not None else None
            if copy is not None:
                self._pending_state_copies.append(copy)
            result = results[seq]
            seq.prompt_logprobs += result.prompt_logprobs
            seq.prompt_top_logprobs += result.prompt_top_logprobs
            if result.token_id is None:
                continue
            forked = self._fork_followers(seq) if seq.followers else []
            updates += [self._append(s, results[s]) for s in (seq, *forked)]
        return updates

    def _append(self, seq: Sequence, result: SeqStepResult) -> SequenceUpdate:
        update = SequenceUpdate(seq, result)
        if seq.wants_prompt_logprobs:
            seq.prompt_logprobs_done = True
            update.prompt_logprobs, update.prompt_top_logprobs = (seq.prompt_logprobs,
                                                                  seq.prompt_top_logprobs)
        seq.output_ids.append(result.token_id)
        if seq.forced_ids:
            seq.forced_ids.popleft()  # the sampler put it in this step
        update.finish_reason, update.stop_token = self._token_ends(seq, result.token_id)
        if update.finish_reason is not None:
            self.finish(seq)
        return update

    def _token_ends(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        """Whether `token`, just appended, ends `seq`: (finish reason, stop token)."""
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            if token in p.stop_token_set:
                return "stop", token
            if p.eos_stops and token in self.eos_token_ids:
                return "stop", None
        if (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or (
                self.max_model_len is not None and seq.num_tokens >= self.max_model_len):
            return "length", None
        return None, None

    def _fork_followers(self, leader: Sequence) -> list[Sequence]:
        """The leader's prefill ended and the step sampled a first token for each follower:
        each takes the leader's cache (and a copy of its state) and joins the running batch
        beside it. A follower that finds no free block for its copy (or no free state slot)
        is prefilled on its own instead."""
        forked = []
        for follower in leader.followers:
            follower.leader = None
            copies = self.bm.fork(leader, follower) if self.state_slots.can_allocate() else None
            if copies is None:
                self.waiting.appendleft(follower)
                continue
            self._pending_copies += copies
            self._pending_state_copies += self.state_slots.fork(leader, follower)
            follower.status = SequenceStatus.RUNNING
            follower.prompt_logprobs = list(leader.prompt_logprobs)
            follower.prompt_top_logprobs = list(leader.prompt_top_logprobs)
            forked.append(follower)
        leader.followers = []
        at = self.running.index(leader) + 1
        self.running[at:at] = forked
        return forked

    def _admit_waiting(self, seqs: list[Sequence], counts: list[int], budget: int,
                       serving: set[Checkpoint]) -> None:
        if self.preempted_this_step:
            return  # the cache is under pressure: let the running sequences drain first
        skipped: list[Sequence] = []
        promised, kept_soon = self._promised_blocks(), self._kept_soon(seqs, counts)
        while self.waiting and budget > 0 and len(seqs) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.checkpoint not in serving or self._waits(seq, promised, kept_soon):
                skipped.append(seq)
                continue
            cached = self.bm.allocate_cached_prefix(seq, self._resumable)
            if self.keeper is not None:
                self.keeper.admit(seq, promised)
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            self.num_prefix_cached_tokens += cached
            n = self._num_new_tokens(seq, budget)
            if not self._make_room_to_admit(seq, n, nothing_scheduled=not seqs):
                self.bm.free_blocks(seq)
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            self.bm.append_slots(seq, n)
            self.state_slots.allocate(seq)
            if cached and self.state_slots.has_state:
                self._pending_state_copies.append(self.keeper.resume(seq, cached))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            promised |= self._uncomputed_prompt_blocks(seq)
            kept_soon |= self._kept_soon([seq], [n])
        self.waiting.extendleft(reversed(skipped))

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """What `seq` runs this step: the rest of it, cut to the token budget, and where
        states are kept, at the points where its prefill stops to keep one."""
        n = min(seq.num_uncomputed_tokens, budget)
        return self.keeper.cut(seq, n) if self.keeper is not None else n

    def _resumable(self, block_hash: int) -> bool:
        """Whether a sequence can resume after the cached block `block_hash`: always,
        unless the model keeps linear-attention states, then only where one is kept."""
        if not self.state_slots.has_state:
            return True
        return self.keeper is not None and self.keeper.resumable(block_hash)

    def _waits(self, seq: Sequence, promised: set[int], kept_soon: set[int]) -> bool:
        """Whether `seq` waits a step to take from the prefix cache what this step computes:
        the next block of its prompt (or, for a hybrid, a state at a point it shares)."""
        if not self.state_slots.has_state:
            return self._next_block_is_promised(seq, promised)
        return self.keeper is not None and self.keeper.waits(seq, promised, kept_soon)

    def _kept_soon(self, seqs: list[Sequence], counts: list[int]) -> set[int]:
        """The prompt blocks (by hash) whose states these steps keep."""
        if self.keeper is None:
            return set()
        return {h for seq, n in zip(seqs, counts)
                if (h := self.keeper.kept_after(seq, n)) is not None}

    def _promised_blocks(self) -> set[int]:
        """Hashes of prompt blocks that running prefills are computing and have not cached."""
        promised: set[int] = set()
        for seq in self.running:
            promised |= self._uncomputed_prompt_blocks(seq)
        return promised

    def _uncomputed_prompt_blocks(self, seq: Sequence) -> set[int]:
        if not self.bm.enable_prefix_caching or seq.num_computed_tokens >= seq.num_prompt_tokens:
            return set()
        hashes = self.bm.prompt_block_hashes(seq)
        return set(hashes[seq.num_computed_tokens // self.bm.block_size:])

    def _next_block_is_promised(self, seq: Sequence, promised: set[int]) -> bool:
        """Whether the first block of `seq`'s prompt that the cache lacks is being computed
        by another sequence: then waiting one step turns it into a cache hit."""
        if not promised:
            return False
        for block_hash in self.bm.prompt_block_hashes(seq):
            if not self.bm.is_cached(block_hash):
                return block_hash in promised
        return False

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
        """Finished, aborted or failed: free its blocks and state slot at once. A leader
        that ends before its prefill hands its followers to the next of them. Idempotent."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if self.keeper is not None:
            self.keeper.finished(seq)
        if seq.leader is not None:          # a follower that never forked
            seq.leader.followers.remove(seq)
            seq.leader = None
        else:
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self.bm.free_blocks(seq)
            self.state_slots.free(seq)
            if seq.followers:               # the next sample takes its place, at the front
                heir, *rest = seq.followers
                heir.leader, seq.followers = None, []
                self._lead(heir, rest)
                self.waiting.appendleft(heir)
        seq.status = SequenceStatus.FINISHED
