"""Where a hybrid model's prefix caching keeps linear-attention states: the scheduler's
rules for engine.state_snapshots. Pure Python.

A cached prefix serves a hybrid prompt only up to a block whose state is kept
(`resumable`), and a state can only be kept after a step that ends on a block boundary
(`keep`). So the rules say where steps end, and who waits for whom:

- a prefill stops at its prompt's last full block (the longest prefix a later prompt may
  take), and where its prefix leaves the blocks that are cached or being computed (the
  point it shares with earlier prompts: only the first prompt to part there can keep a
  state at it, and then a shared prefix of any length serves every prompt after it);
- a decode keeps the state at each block boundary of its output in place of the one
  before, so that a sequence holds one such state however long it runs: the one its next
  turn (this prompt, this output and more) resumes from;
- a waiting prompt whose prefix reaches a state that this step keeps waits a step for it
  (`waits`) instead of computing the prefix again.
"""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sequence import Sequence
from engine.state_snapshots import StateSnapshots


class StateKeeper:
    def __init__(self, snapshots: StateSnapshots, block_manager: BlockManager) -> None:
        self.snapshots = snapshots
        self.bm = block_manager
        self._output_states: dict[Sequence, int] = {}   # seq -> its output's kept state

    def resumable(self, block_hash: int) -> bool:
        """Whether a prompt may resume after the cached block `block_hash`."""
        return block_hash in self.snapshots

    def admit(self, seq: Sequence, promised: set[int]) -> None:
        """Note where `seq`'s prefix leaves the blocks cached or `promised` (being
        computed by running prefills): its prefill stops there."""
        shared = 0
        for block_hash in self.bm.prompt_block_hashes(seq):
            if not (self.bm.is_cached(block_hash) or block_hash in promised):
                break
            shared += self.bm.block_size
        seq.num_matched_tokens = shared

    def resume(self, seq: Sequence, num_cached_tokens: int) -> tuple[int, int]:
        """The copy (kept row, its slot) that `seq`, served its first `num_cached_tokens`
        from the cache, resumes from."""
        return self.snapshots.take(self.bm.block_hash(seq, num_cached_tokens)), seq.state_slot

    def cut(self, seq: Sequence, num_new_tokens: int) -> int:
        """`num_new_tokens` for `seq`'s step, cut at the first point where its prefill stops."""
        bs, start = self.bm.block_size, seq.num_computed_tokens
        last_full_block = (seq.num_prompt_tokens - 1) // bs * bs
        for stop in sorted({seq.num_matched_tokens, last_full_block}):
            if start < stop < start + num_new_tokens:
                return stop - start
        return num_new_tokens

    def kept_after(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """The prompt block (by hash) whose state a step of `num_new_tokens` keeps; None if
        the step ends elsewhere."""
        end = seq.num_computed_tokens + num_new_tokens
        if end % self.bm.block_size or end > seq.num_prompt_tokens:
            return None
        return self.bm.prompt_block_hashes(seq)[end // self.bm.block_size - 1]

    def waits(self, seq: Sequence, promised: set[int], kept_soon: set[int]) -> bool:
        """Whether the deepest state that `seq`'s prefix reaches, through blocks cached or
        `promised`, is one that this step keeps (`kept_soon`): a step later, it is served."""
        wait = False
        for block_hash in self.bm.prompt_block_hashes(seq):
            if not (self.bm.is_cached(block_hash) or block_hash in promised):
                break
            if block_hash in self.snapshots:
                wait = False
            elif block_hash in kept_soon:
                wait = True
        return wait

    def keep(self, seq: Sequence) -> tuple[int, int] | None:
        """After a step: the copy (its slot, a row) that keeps `seq`'s state, if the step
        ended on a block boundary and no state is kept there yet. Past the prompt, the
        state kept at the output's previous boundary goes first."""
        if seq.num_computed_tokens % self.bm.block_size:
            return None
        in_output = seq.num_computed_tokens > seq.num_prompt_tokens
        if in_output and seq in self._output_states:
            self.snapshots.drop(self._output_states.pop(seq))   # its row is reused first
        block_hash = self.bm.block_hash(seq, seq.num_computed_tokens)
        row = self.snapshots.keep(block_hash)
        if row is None:
            return None               # kept already, by another sequence
        if in_output:
            self._output_states[seq] = block_hash
        return seq.state_slot, row

    def finished(self, seq: Sequence) -> None:
        """`seq` is done: its output's state stays kept, as a cache entry of its own."""
        self._output_states.pop(seq, None)
