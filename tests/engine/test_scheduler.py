"""Scheduler: continuous batching, chunked prefill, preemption, one checkpoint per step."""

from __future__ import annotations

from pathlib import Path

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

_arrivals = iter(range(1, 10**9))


def make_seq(n_prompt: int, checkpoint=None, name="s") -> Sequence:
    arrival = next(_arrivals)
    prompt = [arrival * 1000 + i for i in range(n_prompt)]  # distinct: no prefix-cache sharing
    return Sequence(name, prompt, SamplingParams(), seed=0, checkpoint=checkpoint, arrival=arrival)


def complete_step(sched: Scheduler, batch, sample: bool = True) -> None:
    """What the engine does after running a batch: mark tokens computed, append samples."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        before = seq.num_computed_tokens
        seq.num_computed_tokens += n
        sched.bm.cache_full_blocks(seq, before)
        if sample and seq.num_computed_tokens == seq.num_tokens:
            seq.output_ids.append(7)


def test_long_prompt_is_prefilled_in_chunks_next_to_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short = make_seq(3)
    sched.add(short)
    complete_step(sched, sched.schedule())
    long = make_seq(25)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 25:
        batch = sched.schedule()
        assert short in batch.seqs and batch.num_new_tokens[batch.seqs.index(short)] == 1
        chunks.append(batch.num_new_tokens[batch.seqs.index(long)])
        assert sum(batch.num_new_tokens) <= 10
        complete_step(sched, batch)
    assert chunks == [9, 9, 7]


def test_sequence_budget_limits_the_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for _ in range(3):
        sched.add(make_seq(2))
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_full_cache_preempts_the_youngest_and_loses_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, young = make_seq(8, name="old"), make_seq(8, name="young")
    sched.add(old)
    sched.add(young)
    complete_step(sched, sched.schedule())        # both prefilled: 2 blocks each, cache full
    assert bm.num_free_blocks == 0
    batch = sched.schedule()                      # old's 9th token needs a third block: young goes
    assert batch.seqs == [old]
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert sched.waiting[0] is young and young.output_ids == [7]   # keeps its output
    # Recompute covers prompt + output once old finishes (its first block may still be cached).
    sched.finish(old)
    batch = sched.schedule()
    assert batch.seqs == [young]
    assert young.num_computed_tokens + batch.num_new_tokens[0] == young.num_tokens == 9
    sched.finish(young)
    assert bm.num_free_blocks == 4


def test_each_step_serves_one_checkpoint_and_others_take_turns_oldest_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_steps_per_checkpoint=3)
    a, b = Path("/ckpt/a"), Path("/ckpt/b")
    seqs = [make_seq(3, a), make_seq(3, b), make_seq(3, None)]
    for s in seqs:
        sched.add(s)
    served = []
    for _ in range(18):  # the scheduler starts on the base model, which has work
        batch = sched.schedule()
        assert len({s.checkpoint for s in batch.seqs}) == 1
        served.append(batch.checkpoint)
        complete_step(sched, batch)
    assert served == ([None] * 3 + [a] * 3 + [b] * 3) * 2


def test_waiting_work_of_a_checkpoint_preempts_paused_sequences_when_nothing_else_runs():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, max_steps_per_checkpoint=1)
    paused = make_seq(15, Path("/ckpt/a"))
    sched.add(paused)
    complete_step(sched, sched.schedule())        # holds all 4 blocks
    newcomer = make_seq(6, Path("/ckpt/b"))
    sched.add(newcomer)
    batch = sched.schedule()                      # switches to b; a must give way
    assert batch.seqs == [newcomer]
    assert paused.status is SequenceStatus.WAITING


def test_finish_frees_blocks_at_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = make_seq(10)
    sched.add(seq)
    sched.schedule()
    sched.finish(seq)
    assert bm.num_free_blocks == 8 and not sched.has_work()
