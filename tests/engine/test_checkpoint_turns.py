"""CheckpointTurns alone: which checkpoints a step may serve (the scheduler's tests pin
the same rule through whole steps)."""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint_turns import CheckpointTurns
from tests.engine.test_scheduler import make_seq

A, B = Path("/ckpt/a"), Path("/ckpt/b")


def test_a_turn_lasts_while_nothing_waits_outside_it_then_yields_to_what_does():
    turns = CheckpointTurns(max_loras=1, max_steps_per_checkpoint=2)
    on_a = [make_seq(3, A)]
    for step in range(5):                  # past max_steps_per_checkpoint: nobody waits
        assert turns.pick(on_a, step) == {A}
        turns.stepped()
    assert turns.pick([*on_a, make_seq(3, B)], 5) == {B}


def test_the_base_model_joins_a_full_set_since_it_takes_no_adapter_slot():
    turns = CheckpointTurns(max_loras=1, max_steps_per_checkpoint=2)
    assert turns.pick([make_seq(3, A), make_seq(3, B), make_seq(3, None)], 0) == {A, None}
