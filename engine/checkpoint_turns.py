"""Which checkpoints a step may serve: the scheduler's turns among them.

Sequences of different checkpoints share a step: up to `max_loras` distinct adapters
(vLLM's count: the base model takes no slot), each row adding its own adapter to the
unmerged base weights; a step with one checkpoint runs it merged instead
(engine.checkpoints.lora_serving). A checkpoint that cannot mix (`mixable` says no:
MoE expert adapters, or a family or mode that only merges) is served alone.

The set a step serves keeps the checkpoints it serves while they have work and takes
newcomers while it has room; when work waits outside it for `max_steps_per_checkpoint`
steps, the turn ends and the least recently served checkpoints (oldest request first)
come in, so none starves. With nothing that mixes, that is one checkpoint per step, in
turns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from engine.sequence import Sequence

Checkpoint = Path | None     # None: the base model


def always(checkpoint: Checkpoint) -> bool:
    return True


class CheckpointTurns:
    def __init__(self, max_loras: int, max_steps_per_checkpoint: int,
                 mixable: Callable[[Checkpoint], bool] = always) -> None:
        self.max_loras = max_loras
        self.max_steps_per_checkpoint = max_steps_per_checkpoint
        self.mixable = mixable
        self.serving: list[Checkpoint] = [None]     # the checkpoints steps serve now
        self.serving_alone = not mixable(None)      # serving one that cannot mix
        self.steps_in_turn = 0                      # steps since the set last turned over
        self.last_served: dict[Checkpoint, int] = {}

    def pick(self, with_work: Iterable[Sequence], step: int) -> set[Checkpoint]:
        """The checkpoints step number `step` may serve, given the sequences with work."""
        oldest: dict[Checkpoint, int] = {}          # checkpoint -> its oldest request
        for seq in with_work:
            oldest[seq.checkpoint] = min(oldest.get(seq.checkpoint, seq.arrival), seq.arrival)
        outside = oldest.keys() - set(self.serving)
        if outside and self.steps_in_turn >= self.max_steps_per_checkpoint:
            for checkpoint in self.serving:          # the turn is over: to the back of the line
                self.last_served[checkpoint] = step
            self.serving, outside = [], set(oldest)
        self.serving = [c for c in self.serving if c in oldest]
        if not self.serving:
            self.steps_in_turn = 0
        for checkpoint in sorted(outside, key=lambda c: (self.last_served.get(c, -1), oldest[c])):
            if not self.serving:
                self.serving, self.serving_alone = [checkpoint], not self.mixable(checkpoint)
            elif not self.serving_alone and self._has_room(checkpoint) and self.mixable(checkpoint):
                self.serving.append(checkpoint)
        return set(self.serving)

    def stepped(self) -> None:
        """A step served the set."""
        self.steps_in_turn += 1

    def _has_room(self, checkpoint: Checkpoint) -> bool:
        """Whether the set can take `checkpoint`: the base model needs no adapter slot."""
        return checkpoint is None or sum(c is not None for c in self.serving) < self.max_loras
