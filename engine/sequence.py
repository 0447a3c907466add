"""One sequence being generated: its tokens, its place in the KV cache, its sampling state.

The scheduler owns every sequence: it admits, advances (after each step), forks,
preempts and finishes them; other modules only read them. Samples 1..n-1 of one prompt
start as *followers* of sample 0, their leader: they wait for its prefill and then
fork from it, so that the prompt is computed once.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.outputs import TopLogprobs
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not in the cache (new, or preempted and to be recomputed)
    RUNNING = "running"      # holds KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                            # this sequence's own random stream
    checkpoint: Path | None = None       # None: the base model
    checkpoint_version: float = 0.0      # when it was completed: a re-saved checkpoint is new
    arrival: int = 0                     # admission order; lower = older = higher priority
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    prompt_hashes: list[int] | None = None   # its prompt's full blocks' chained hashes, once
    state_slot: int | None = None        # its row of the linear-attention state pool (hybrids)
    num_computed_tokens: int = 0         # tokens whose k/v are in the cache
    num_cached_tokens: int = 0           # prompt tokens the prefix cache served (first admission)
    num_matched_tokens: int = 0          # of its prefix, tokens whose blocks were cached at its
                                         # admission, served or not (hybrids: engine.scheduler)
    prompt_logprobs_done: bool = False   # prompt logprobs are computed once, not on recompute
    # Chunk by chunk, until they go out with the first token: entry 0 (no prefix) is None.
    prompt_logprobs: list[float | None] = field(default_factory=lambda: [None])
    prompt_top_logprobs: list[TopLogprobs | None] = field(default_factory=lambda: [None])
    forced_ids: deque[int] = field(default_factory=deque)  # the next tokens, chosen, not sampled
    leader: Sequence | None = None       # a follower: the sample whose prefill it waits for
    followers: list[Sequence] = field(default_factory=list)   # samples that wait for this one

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` without building the whole list: a decode needs one token."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_done

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; prompt + output so far will be prefilled again."""
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.num_computed_tokens = 0
