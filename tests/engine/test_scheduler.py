"""Scheduler: continuous batching, chunked prefill, preemption, checkpoints sharing steps
up to max_loras (in turns beyond), and one per step for those that cannot mix."""

from __future__ import annotations

from pathlib import Path

from engine.block_manager import BlockManager
from engine.outputs import SeqStepResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

_arrivals = iter(range(1, 10**9))


def make_seq(n_prompt: int, checkpoint=None, name="s") -> Sequence:
    arrival = next(_arrivals)
    prompt = [arrival * 1000 + i for i in range(n_prompt)]  # distinct: no prefix-cache sharing
    return Sequence(name, prompt, SamplingParams(), seed=0, checkpoint=checkpoint, arrival=arrival)


def complete_step(sched: Scheduler, batch, sample: bool = True, token: int = 7) -> list:
    """What the engine does after running a batch: the scheduler advances it by the step's
    results (a token for each sequence whose step reached its end, and for its followers)."""
    results = {}
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        due = sample and seq.num_computed_tokens + n == seq.num_tokens
        for s in (seq, *seq.followers) if due else (seq,):
            results[s] = SeqStepResult(token_id=token if due else None)
    return sched.update(batch, results)


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


def never_mixes(checkpoint) -> bool:
    return False


def test_checkpoints_that_cannot_mix_get_a_step_each_and_take_turns_oldest_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_steps_per_checkpoint=3, mixable=never_mixes)
    a, b = Path("/ckpt/a"), Path("/ckpt/b")
    seqs = [make_seq(3, a), make_seq(3, b), make_seq(3, None)]
    for s in seqs:
        sched.add(s)
    served = []
    for _ in range(18):  # the scheduler starts on the base model, which has work
        batch = sched.schedule()
        assert len(batch.checkpoints) == 1
        served.append(batch.checkpoints[0])
        complete_step(sched, batch)
    assert served == ([None] * 3 + [a] * 3 + [b] * 3) * 2


def test_waiting_work_of_a_checkpoint_preempts_paused_sequences_when_nothing_else_runs():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, max_steps_per_checkpoint=1,
                      mixable=never_mixes)
    paused = make_seq(15, Path("/ckpt/a"))
    sched.add(paused)
    complete_step(sched, sched.schedule())        # holds all 4 blocks
    newcomer = make_seq(6, Path("/ckpt/b"))
    sched.add(newcomer)
    batch = sched.schedule()                      # switches to b; a must give way
    assert batch.seqs == [newcomer]
    assert paused.status is SequenceStatus.WAITING


def test_sequences_of_several_checkpoints_and_the_base_share_a_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_loras=2)
    a, b = Path("/ckpt/a"), Path("/ckpt/b")
    seqs = [make_seq(3, a), make_seq(3, None), make_seq(3, b), make_seq(3, a)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs                       # the base takes no adapter slot
    assert batch.checkpoints == [a, None, b]


def test_beyond_max_loras_checkpoints_take_turns_and_none_starves():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=100,
                      max_loras=2, max_steps_per_checkpoint=2)
    ckpts = [Path(f"/ckpt/{name}") for name in "abcde"]
    for c in ckpts:
        for _ in range(2):
            sched.add(make_seq(3, c))
    served = []
    for _ in range(10):
        batch = sched.schedule()
        assert len(batch.checkpoints) <= 2
        served.append(set(batch.checkpoints))
        complete_step(sched, batch)
    assert served[:2] == [{ckpts[0], ckpts[1]}] * 2     # the oldest first, for a turn of 2 steps
    assert served[2:4] == [{ckpts[2], ckpts[3]}] * 2    # then those never served
    assert served[4] == {ckpts[4], ckpts[0]}             # e, then the least recently served
    assert set().union(*served[:6]) == set(ckpts)


def test_a_checkpoint_that_cannot_mix_is_served_alone_in_its_turn():
    experts = Path("/ckpt/experts")
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      max_steps_per_checkpoint=2, mixable=lambda c: c != experts)
    a = Path("/ckpt/a")
    for c in (a, experts, None):
        sched.add(make_seq(3, c))
    served = []
    for _ in range(6):
        batch = sched.schedule()
        served.append(batch.checkpoints)
        complete_step(sched, batch)
    assert served == [[a, None]] * 2 + [[experts]] * 2 + [[a, None]] * 2


def test_finish_frees_blocks_at_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = make_seq(10)
    sched.add(seq)
    sched.schedule()
    sched.finish(seq)
    assert bm.num_free_blocks == 8 and not sched.has_work()


def test_update_ends_sequences_on_eos_a_stop_token_or_the_length_limit():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      eos_token_ids=(0,), max_model_len=6)
    by_eos = Sequence("eos", [1, 2], SamplingParams(), seed=0)
    by_token = Sequence("tok", [1, 3], SamplingParams(stop=[7]), seed=0)
    by_eos_too_early = Sequence("min", [1, 4], SamplingParams(min_tokens=2), seed=0)
    by_max_tokens = Sequence("max", [1, 5], SamplingParams(max_tokens=1, ignore_eos=True), seed=0)
    by_context = Sequence("ctx", [1, 2, 3, 4, 5], SamplingParams(ignore_eos=True), seed=0)
    for seq in (by_eos, by_token, by_eos_too_early, by_max_tokens, by_context):
        sched.add(seq)
    batch = sched.schedule()
    rest = [s for s in batch.seqs if s is not by_token]
    updates = complete_step(sched, _batch_of(batch, rest), token=0)        # EOS for them
    updates += complete_step(sched, _batch_of(batch, [by_token]), token=7)
    ends = {u.seq.request_id: (u.finish_reason, u.stop_token) for u in updates}
    assert ends == {"eos": ("stop", None), "tok": ("stop", 7), "min": (None, None),
                    "max": ("length", None), "ctx": ("length", None)}
    assert by_eos.status is SequenceStatus.FINISHED and not by_eos.block_table
    assert by_eos_too_early.status is SequenceStatus.RUNNING


def _batch_of(batch, seqs):
    """The part of `batch` that is `seqs` (to give them other tokens than the rest)."""
    counts = [batch.num_new_tokens[batch.seqs.index(s)] for s in seqs]
    return type(batch)(seqs, counts)


def make_samples(n: int, n_prompt: int) -> list[Sequence]:
    prompt = list(range(100, 100 + n_prompt))
    return [Sequence(f"s-{i}", prompt, SamplingParams(), seed=i, arrival=next(_arrivals))
            for i in range(n)]


def test_followers_fork_from_their_leaders_prefill_sharing_its_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    leader, *followers = make_samples(3, 10)       # 2 full blocks and a partial one
    sched.add(leader, followers)
    batch = sched.schedule()
    assert batch.seqs == [leader] and sched.num_waiting == 2
    updates = complete_step(sched, batch)
    assert [u.seq for u in updates] == [leader, *followers]     # one first token each
    assert sched.running == [leader, *followers] and sched.num_waiting == 0
    for f in followers:
        assert f.block_table[:2] == leader.block_table[:2]      # shared
        assert f.block_table[2] != leader.block_table[2]        # its own copy of the partial
        assert f.num_computed_tokens == 10 and f.output_ids == [7]
    assert bm.blocks[leader.block_table[0]].ref_count == 3
    nxt = sched.schedule()
    assert sorted(nxt.block_copies) == sorted((leader.block_table[2], f.block_table[2])
                                              for f in followers)
    assert nxt.num_new_tokens == [1, 1, 1]                      # all decode now
    assert sched.num_computed_prompt_tokens == 10


def test_a_follower_that_finds_no_free_block_is_prefilled_on_its_own():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    leader, follower = make_samples(2, 10)          # the leader takes all 3 blocks
    sched.add(leader, [follower])
    updates = complete_step(sched, sched.schedule())
    assert [u.seq for u in updates] == [leader]
    assert sched.waiting[0] is follower and follower.leader is None
    assert follower.output_ids == [] and follower.num_computed_tokens == 0


def test_a_leader_ended_before_its_prefill_hands_its_followers_to_the_next_sample():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    leader, second, third = make_samples(3, 10)
    sched.add(leader, [second, third])
    complete_step(sched, sched.schedule())          # a first chunk of the prompt
    sched.finish(leader)                            # aborted
    assert sched.waiting[0] is second and second.followers == [third]
    assert third.leader is second and bm.num_free_blocks == 16
    sched.finish(third)                             # a follower that never forked
    assert second.followers == [] and third.leader is None


def test_a_prompt_waits_for_the_blocks_another_prefill_is_computing_then_hits_the_cache():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    shared = list(range(200, 212))                  # 3 full blocks in common
    first = Sequence("a", shared + [1, 2], SamplingParams(), seed=0, arrival=next(_arrivals))
    second = Sequence("b", shared + [3, 4], SamplingParams(), seed=0, arrival=next(_arrivals))
    unrelated = make_seq(6)
    for seq in (first, second, unrelated):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [first, unrelated]         # b waits: a is computing its blocks
    complete_step(sched, batch)
    batch = sched.schedule()
    assert second in batch.seqs and second.num_cached_tokens == 12
    assert sched.num_computed_prompt_tokens == 14 + 6
    complete_step(sched, batch)
    assert sched.num_computed_prompt_tokens == 14 + 6 + 2
