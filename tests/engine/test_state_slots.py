"""State slots: the allocator alone, and the scheduler taking and returning them."""

from __future__ import annotations

from pathlib import Path

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import SequenceStatus
from engine.state_slots import StateSlotAllocator
from tests.engine.test_scheduler import complete_step, make_samples, make_seq, never_mixes


def test_slots_are_distinct_until_exhausted_and_reused_once_freed():
    slots = StateSlotAllocator(3)
    seqs = [make_seq(2) for _ in range(3)]
    for seq in seqs:
        assert slots.can_allocate()
        slots.allocate(seq)
    assert sorted(s.state_slot for s in seqs) == [0, 1, 2]
    assert not slots.can_allocate() and slots.num_free_slots == 0
    slots.free(seqs[1])
    slots.free(seqs[1])                                   # twice: nothing more comes back
    assert seqs[1].state_slot is None and slots.num_free_slots == 1
    newcomer = make_seq(2)
    slots.allocate(newcomer)
    assert newcomer.state_slot == 1


def test_a_model_without_state_gives_no_slot_and_never_blocks():
    slots = StateSlotAllocator(None)
    seq = make_seq(2)
    slots.allocate(seq)
    assert seq.state_slot is None and slots.can_allocate() and slots.num_total_slots == 0


def test_admission_takes_a_slot_and_finish_returns_it():
    slots = StateSlotAllocator(2)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      state_slots=slots)
    seq = make_seq(5)
    sched.add(seq)
    assert seq.state_slot is None
    sched.schedule()
    assert seq.state_slot is not None and slots.num_free_slots == 1
    sched.finish(seq)
    assert seq.state_slot is None and slots.num_free_slots == 2


def test_without_a_free_slot_a_sequence_waits_though_blocks_are_free():
    slots = StateSlotAllocator(2)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      state_slots=slots)
    first, second, third = make_seq(3), make_seq(3), make_seq(3)
    for seq in (first, second, third):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [first, second] and list(sched.waiting) == [third]
    complete_step(sched, batch)
    freed = first.state_slot
    sched.finish(first)
    batch = sched.schedule()
    assert batch.seqs == [second, third] and third.state_slot == freed


def test_preemption_returns_the_slot_and_readmission_takes_one_again():
    bm, slots = BlockManager(num_blocks=4, block_size=4), StateSlotAllocator(2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, state_slots=slots)
    old, young = make_seq(8, name="old"), make_seq(8, name="young")
    sched.add(old)
    sched.add(young)
    complete_step(sched, sched.schedule())               # both prefilled: the cache is full
    sched.schedule()                                     # old needs a block: young is preempted
    assert young.status is SequenceStatus.WAITING and young.state_slot is None
    assert slots.num_free_slots == 1
    sched.finish(old)
    batch = sched.schedule()
    assert batch.seqs == [young] and young.state_slot is not None
    sched.finish(young)
    assert slots.num_free_slots == 2 and bm.num_free_blocks == 4


def test_paused_sequences_of_another_checkpoint_give_up_their_slots_when_nothing_runs():
    # Checkpoints that never mix: each step serves one, in turns.
    slots = StateSlotAllocator(1)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_steps_per_checkpoint=1, state_slots=slots, mixable=never_mixes)
    paused = make_seq(15, Path("/ckpt/a"))
    sched.add(paused)
    complete_step(sched, sched.schedule())               # holds the only slot
    newcomer = make_seq(6, Path("/ckpt/b"))
    sched.add(newcomer)
    batch = sched.schedule()                             # switches to b: a must give way
    assert batch.seqs == [newcomer] and newcomer.state_slot == 0
    assert paused.status is SequenceStatus.WAITING and paused.state_slot is None


def test_a_newcomer_of_another_checkpoint_waits_for_a_slot_beside_a_mixed_step_then_takes_it():
    slots = StateSlotAllocator(1)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_steps_per_checkpoint=1, state_slots=slots)
    running = make_seq(15, Path("/ckpt/a"))
    running.params = SamplingParams(max_tokens=2)
    sched.add(running)
    complete_step(sched, sched.schedule())               # holds the only slot
    newcomer = make_seq(6, Path("/ckpt/b"))
    sched.add(newcomer)
    batch = sched.schedule()                             # b may mix in, but has no slot
    assert batch.seqs == [running] and newcomer.state_slot is None
    complete_step(sched, batch)                          # a's last token frees its slot
    assert sched.schedule().seqs == [newcomer] and newcomer.state_slot == 0


def test_forked_samples_get_slots_of_their_own_and_a_copy_of_the_leaders_state():
    slots = StateSlotAllocator(4)
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      state_slots=slots)
    leader, *followers = make_samples(3, 10)
    sched.add(leader, followers)
    complete_step(sched, sched.schedule())          # the prefill ends: the followers fork
    assert len({leader.state_slot, *(f.state_slot for f in followers)}) == 3
    nxt = sched.schedule()
    assert sorted(nxt.state_copies) == sorted((leader.state_slot, f.state_slot)
                                              for f in followers)
    complete_step(sched, nxt)
    assert sched.schedule().state_copies == []                # copied once


def test_a_follower_that_finds_no_free_slot_is_prefilled_on_its_own():
    slots = StateSlotAllocator(1)
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      state_slots=slots)
    leader, follower = make_samples(2, 10)
    sched.add(leader, [follower])
    updates = complete_step(sched, sched.schedule())
    assert [u.seq for u in updates] == [leader]
    assert sched.waiting[0] is follower and follower.state_slot is None
    assert follower.num_computed_tokens == 0 and not follower.block_table
