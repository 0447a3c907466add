"""Kept linear-attention states at block boundaries: prefix caching for a hybrid model.
Pure Python.

A cached KV block restores an attention layer's past, but a linear-attention layer
(engine.layers.linear_attention) folds the whole past into one running state per
sequence, which no block holds. So when a step ends exactly at a block boundary, the
scheduler keeps a copy of the sequence's state there, keyed by that block's chained hash
(engine.block_manager: equal keys mean equal prefixes under equal weights): at the
prompt's boundaries that a prefill ends on (it stops at its last full block and where it
leaves the blocks earlier prompts cached), and at the latest boundary of its output
(the one a next turn, whose prompt is this prompt and output and more, resumes from);
engine.state_keeper holds those rules.
A later prompt with that prefix takes the cached blocks up to the last one with a kept
state, and a copy of that state into its own slot; it computes the rest.

The kept states are rows of the runner's state pool past the live slots
(engine.state_slots); this class only says which row holds which prefix, and which
row goes when a new one is kept: the least recently used. The copies themselves go with
the next step (`ScheduledBatch.state_copies`), in order.
"""

from __future__ import annotations

from collections import OrderedDict


class StateSnapshots:
    def __init__(self, first_row: int, num_rows: int) -> None:
        """The rows [first_row, first_row + num_rows) of the state pool, all free."""
        assert num_rows > 0, "a hybrid model without kept states serves no prefix cache"
        self._free = list(range(first_row + num_rows - 1, first_row - 1, -1))   # lowest on top
        self._rows: OrderedDict[int, int] = OrderedDict()   # block hash -> row, LRU first

    @property
    def num_kept(self) -> int:
        return len(self._rows)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._rows

    def take(self, block_hash: int) -> int:
        """The row of the state kept after the block `block_hash` (it must be kept), now
        the most recently used: copy it into the slot of the sequence that resumes there."""
        self._rows.move_to_end(block_hash)
        return self._rows[block_hash]

    def keep(self, block_hash: int) -> int | None:
        """A row for the state after the block `block_hash`, freeing the least recently
        used one if none is free; None if that prefix's state is kept already."""
        if block_hash in self._rows:
            self._rows.move_to_end(block_hash)
            return None
        row = self._free.pop() if self._free else self._rows.popitem(last=False)[1]
        self._rows[block_hash] = row
        return row

    def drop(self, block_hash: int) -> None:
        """Free the row of the state after `block_hash`, if it is still kept."""
        row = self._rows.pop(block_hash, None)
        if row is not None:
            self._free.append(row)
