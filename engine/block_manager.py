"""KV-cache block bookkeeping with reference counts and prefix caching. Pure Python.

A full block is keyed by a hash chained over the previous block's hash and its own
token ids, so equal keys mean equal prefixes. The chain starts from a seed per
checkpoint: a base-model block never serves a LoRA checkpoint. A hit is confirmed
against the stored token ids, so a hash collision can only cost a miss.

Freed blocks keep their contents and hash until they are handed out again, oldest
freed first, so a prefix that was used recently stays reusable as long as possible.

Forking (the samples of one prompt, after its one prefill) shares the parent's full
blocks by reference count and copies its partial last block, which each child goes on
writing on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from engine.sequence import Sequence

NO_HASH = -1


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int, token_ids: tuple[int, ...]) -> int:
    h = xxhash.xxh64(prev_hash.to_bytes(8, "little", signed=True))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.intdigest() & 0x7FFF_FFFF_FFFF_FFFF


def checkpoint_seed(seq: Sequence) -> int:
    """Where a sequence's hash chain starts: its weights (checkpoint and version) and nothing else."""
    if seq.checkpoint is None:
        return 0
    key = f"{seq.checkpoint}@{seq.checkpoint_version}".encode()
    return xxhash.xxh64_intdigest(key) & 0x7FFF_FFFF_FFFF_FFFF


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, oldest freed first (an ordered set: cache hits remove from the middle).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_cached_prefix(self, seq: Sequence,
                               resumable: Callable[[int], bool] = lambda block_hash: True) -> int:
        """Give a newly admitted sequence the cached blocks of its longest cached prefix
        that ends at a block `resumable` accepts (by its hash: for a hybrid model, one
        whose linear-attention state is kept, engine.state_snapshots).

        At least one token is left to compute, so the step that finishes the prefill
        produces the logits to sample from. Returns the number of cached tokens.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return 0
        bs, tokens, hits = self.block_size, seq.token_ids, []
        for i, h in enumerate(self._block_hashes(seq)[:(len(tokens) - 1) // bs]):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                    tokens[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        while hits and not resumable(self.blocks[hits[-1]].hash):
            hits.pop()
        for block_id in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def block_hash(self, seq: Sequence, num_tokens: int) -> int:
        """The hash of the block of `seq` that ends at `num_tokens` (a multiple of the
        block size; NO_HASH if that block is not registered)."""
        return self.blocks[seq.block_table[num_tokens // self.block_size - 1]].hash

    def prompt_block_hashes(self, seq: Sequence) -> list[int]:
        """The chained hashes of the prompt's full blocks (what a prefix hit would match),
        computed once: a prompt never changes, and the scheduler asks every step."""
        if seq.prompt_hashes is None:
            seq.prompt_hashes = self._chain(checkpoint_seed(seq), seq.prompt_ids)
        return seq.prompt_hashes

    def _block_hashes(self, seq: Sequence) -> list[int]:
        """The chained hashes of all of `seq`'s full blocks: its prompt's, then (when it is
        recomputed after a preemption) its output's."""
        hashes = self.prompt_block_hashes(seq)
        if not seq.output_ids:
            return hashes
        rest = seq.token_ids[len(hashes) * self.block_size:]
        return hashes + self._chain(hashes[-1] if hashes else checkpoint_seed(seq), rest)

    def _chain(self, h: int, tokens: list[int]) -> list[int]:
        """The hashes of `tokens`' full blocks, chained on from `h`."""
        bs, hashes = self.block_size, []
        for start in range(0, len(tokens) - bs + 1, bs):
            h = chain_hash(h, tuple(tokens[start:start + bs]))
            hashes.append(h)
        return hashes

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self.hash_to_block

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return total - len(seq.block_table) <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold `num_new_tokens` more tokens (check can_append first)."""
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self._allocate())

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Give `child` the cache of `parent`'s computed tokens: full blocks shared, the
        partial last one copied. Returns the (source, destination) block copies to make
        before the child writes to it, or None (nothing changed) if no block is free."""
        assert not child.block_table
        full, partial = divmod(parent.num_computed_tokens, self.block_size)
        if partial and not self.free:
            return None
        for block_id in parent.block_table[:full]:
            self._take(block_id)
            child.block_table.append(block_id)
        copies = []
        if partial:
            child.block_table.append(self._allocate())
            copies.append((parent.block_table[full], child.block_table[-1]))
        child.num_computed_tokens = parent.num_computed_tokens
        return copies

    def cache_full_blocks(self, seq: Sequence, old_num_computed: int) -> None:
        """Register the blocks that the last step filled, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, end = old_num_computed // bs, seq.num_computed_tokens // bs
        if first >= end:
            return
        h = self.blocks[seq.block_table[first - 1]].hash if first else checkpoint_seed(seq)
        tokens = seq.token_ids
        for i in range(first, end):
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(h, chunk)
            block.hash, block.token_ids = h, chunk
            self.hash_to_block.setdefault(h, block.block_id)

    def free_blocks(self, seq: Sequence) -> None:
        # Tail blocks first, so that the prefix's blocks are the last to be reused.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []

    def _allocate(self) -> int:
        """A free block for new content: the least recently freed one, its old hash dropped."""
        block_id = next(iter(self.free))
        self._evict(block_id)
        self._take(block_id)
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = NO_HASH, ()
