"""Kept linear-attention states, prefix caching for a hybrid model: the table of kept
states alone, the scheduler keeping and resuming from them, the runner's ordered copies.
(tests/engine/models/test_qwen3_5.py holds the outputs against transformers.)"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.layers.linear_attention import LinearAttentionState
from engine.model_runner import copy_state_rows
from engine.models.qwen3_5 import Qwen3_5Config
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.state_slots import StateSlotAllocator
from engine.state_snapshots import StateSnapshots
from tests.engine.test_cache_capacity import QWEN3_5
from tests.engine.test_scheduler import complete_step

LIVE = 4                      # live slots 0-3; kept states in rows 4-7
PROMPT = list(range(100, 114))   # 14 tokens: its last full block before the last token ends at 12


def hybrid_scheduler(budget: int = 100, kept: StateSnapshots | None = None) -> Scheduler:
    return Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=budget,
                     state_slots=StateSlotAllocator(LIVE),
                     state_snapshots=kept or StateSnapshots(LIVE, LIVE))


def seq_of(prompt: list[int], name: str = "s") -> Sequence:
    return Sequence(name, prompt, SamplingParams(), seed=0)


def run_prefill(sched: Scheduler, seq: Sequence) -> list:
    """Steps until `seq`'s prefill is done (it sampled its first token); the batches."""
    batches = []
    while not seq.output_ids:
        batches.append(sched.schedule())
        complete_step(sched, batches[-1])
    return batches


def test_rows_are_handed_out_until_all_hold_a_state_then_the_least_recently_used_goes():
    kept = StateSnapshots(first_row=4, num_rows=2)
    assert kept.keep(101) == 4 and kept.keep(102) == 5
    assert kept.keep(101) is None                 # that prefix's state is kept already
    assert kept.keep(103) == 5                    # 102 was the least recently used
    assert 102 not in kept and 101 in kept and 103 in kept
    assert kept.take(101) == 4                    # resuming from it makes it recent again
    assert kept.keep(104) == 5 and 103 not in kept and kept.num_kept == 2


def test_a_prefill_stops_at_its_prompts_last_full_block_and_keeps_the_state_there():
    sched, seq = hybrid_scheduler(), seq_of(PROMPT)
    sched.add(seq)
    first = sched.schedule()
    assert first.num_new_tokens == [12]
    complete_step(sched, first)
    second = sched.schedule()
    assert second.num_new_tokens == [2]
    assert second.state_copies == [(seq.state_slot, LIVE)]      # kept before the step runs


def test_every_prefill_chunk_that_ends_on_a_block_boundary_keeps_its_state():
    sched, seq = hybrid_scheduler(budget=8), seq_of(PROMPT)
    sched.add(seq)
    batches = run_prefill(sched, seq)
    assert [b.num_new_tokens for b in batches] == [[8], [4], [2]]
    assert [b.state_copies for b in batches] == [[], [(seq.state_slot, 4)],
                                                 [(seq.state_slot, 5)]]


def test_a_prompt_with_a_kept_prefix_resumes_from_a_copy_of_that_state():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    run_prefill(sched, first)
    sched.finish(first)
    later = seq_of(PROMPT[:12] + [7, 8, 9], "b")
    sched.add(later)
    batch = sched.schedule()
    assert batch.seqs == [later] and batch.num_new_tokens == [3]
    assert later.num_cached_tokens == 12 and sched.num_prefix_cached_tokens == 12
    assert batch.state_copies == [(LIVE, later.state_slot)]


def test_cached_blocks_past_the_last_kept_state_are_not_taken():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    run_prefill(sched, first)                  # blocks of tokens 0-11 cached, a state at 12 only
    later = seq_of(PROMPT[:8] + [7, 8, 9], "b")
    sched.add(later)
    batch = sched.schedule()
    assert later.num_cached_tokens == 0 and batch.state_copies == []
    assert not set(later.block_table) & set(first.block_table)


def test_a_prefill_also_stops_where_its_prefix_leaves_the_cached_blocks_and_keeps_it():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    run_prefill(sched, first)                  # a state at 12 only
    second = seq_of(PROMPT[:8] + [7, 8, 9, 10, 11, 12], "b")   # shares blocks 0-1 with a
    sched.add(second)
    batches = run_prefill(sched, second)
    assert second.num_cached_tokens == 0       # nothing kept at 8 yet: computed again
    assert [b.num_new_tokens[-1] for b in batches] == [8, 4, 2]
    assert (second.state_slot, LIVE + 1) in batches[1].state_copies   # kept at 8
    third = seq_of(PROMPT[:8] + [1, 2, 3], "c")
    sched.add(third)
    batch = sched.schedule()
    assert third.num_cached_tokens == 8 and batch.state_copies == [(LIVE + 1, third.state_slot)]


def test_prompts_arriving_together_part_and_the_third_waits_for_the_state_kept_there():
    sched = hybrid_scheduler()
    a, b = seq_of(PROMPT, "a"), seq_of(PROMPT[:8] + [7, 8, 9, 10, 11, 12], "b")
    c = seq_of(PROMPT[:8] + [1, 2, 3], "c")
    for seq in (a, b, c):
        sched.add(seq)
    first = sched.schedule()
    # b shares blocks 0-1 with a's prefill: it stops at 8 to keep the state there, and c,
    # whose prefix reaches that state, waits for it instead of computing the prefix too.
    assert first.seqs == [a, b] and first.num_new_tokens == [12, 8]
    complete_step(sched, first)
    second = sched.schedule()
    assert second.seqs == [a, b, c] and c.num_cached_tokens == 8
    kept_by_b = second.state_copies[1][1]
    assert second.state_copies == [(a.state_slot, LIVE), (b.state_slot, kept_by_b),
                                   (kept_by_b, c.state_slot)]


def test_a_prompt_that_reaches_a_deeper_kept_state_does_not_wait_for_a_shorter_one():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    run_prefill(sched, first)                  # a state at 12
    sched.finish(first)
    parting = seq_of(PROMPT[:8] + [7, 8, 9, 10, 11, 12], "b")   # keeps one at 8 this step
    longer = seq_of(PROMPT[:12] + [5], "c")
    sched.add(parting)
    sched.add(longer)
    batch = sched.schedule()
    assert batch.seqs == [parting, longer] and batch.num_new_tokens == [8, 1]
    assert longer.num_cached_tokens == 12


def test_without_kept_states_a_hybrid_model_takes_nothing_from_the_prefix_cache():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100,
                      state_slots=StateSlotAllocator(LIVE))
    first = seq_of(PROMPT, "a")
    sched.add(first)
    run_prefill(sched, first)
    later = seq_of(PROMPT[:12] + [7], "b")
    sched.add(later)
    batch = sched.schedule()
    assert later.num_cached_tokens == 0 and batch.num_new_tokens[-1] == 13


def test_an_evicted_state_ends_its_prefixs_reuse():
    sched = hybrid_scheduler(kept=StateSnapshots(LIVE, 1))
    for name, prompt in (("a", PROMPT), ("b", [9] * 14)):     # b's state takes a's row
        seq = seq_of(prompt, name)
        sched.add(seq)
        run_prefill(sched, seq)
        sched.finish(seq)
    later = seq_of(PROMPT[:12] + [7], "c")
    sched.add(later)
    sched.schedule()
    assert later.num_cached_tokens == 0


def test_a_state_kept_and_resumed_from_in_one_step_is_copied_in_that_order():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    complete_step(sched, sched.schedule())     # 12 tokens computed; their state is kept next
    later = seq_of(PROMPT[:12] + [7], "b")
    sched.add(later)
    batch = sched.schedule()
    assert batch.state_copies == [(first.state_slot, LIVE), (LIVE, later.state_slot)]
    assert first.state_slot != later.state_slot


def decode_to(sched: Scheduler, seq: Sequence, num_computed: int) -> list:
    """Steps until `num_computed` of `seq`'s tokens are computed; the batches."""
    batches = []
    while seq.num_computed_tokens < num_computed:
        batches.append(sched.schedule())
        complete_step(sched, batches[-1])
    return batches


def test_a_decode_keeps_the_state_at_each_output_boundary_in_place_of_the_one_before():
    sched, seq = hybrid_scheduler(), seq_of(PROMPT)
    sched.add(seq)
    decode_to(sched, seq, 16)               # the prompt's state at 12, the output's at 16
    at_16 = sched.bm.block_hash(seq, 16)
    assert sched.keeper.snapshots.num_kept == 2 and at_16 in sched.keeper.snapshots
    assert sched.schedule().state_copies == [(seq.state_slot, LIVE + 1)]   # before the step
    decode_to(sched, seq, 20)
    kept = sched.keeper.snapshots
    assert at_16 not in kept and sched.bm.block_hash(seq, 20) in kept
    assert sched.keeper.snapshots.num_kept == 2
    assert sched.bm.block_hash(seq, 12) in sched.keeper.snapshots      # the prompt's stays
    assert sched.schedule().state_copies == [(seq.state_slot, LIVE + 1)]   # the row reused


def test_a_next_turn_resumes_from_the_state_its_previous_turn_kept_last():
    sched, first = hybrid_scheduler(), seq_of(PROMPT, "a")
    sched.add(first)
    decode_to(sched, first, 21)
    at_20 = sched.bm.block_hash(first, 20)
    sched.finish(first)
    row = sched.keeper.snapshots.take(at_20)
    later = seq_of(first.token_ids[:21] + [8, 9], "b")     # the conversation goes on
    sched.add(later)
    batch = sched.schedule()
    assert later.num_cached_tokens == 20 and batch.num_new_tokens == [3]
    assert batch.state_copies == [(row, later.state_slot)]


def test_an_output_state_another_sequence_kept_first_is_not_dropped_by_this_one():
    sched = hybrid_scheduler()
    a = Sequence("a", PROMPT, SamplingParams(max_tokens=3), seed=0)   # ends at 16 computed
    b = seq_of(PROMPT, "b")             # the same prompt and tokens: the same hashes
    sched.add(a)
    sched.add(b)
    decode_to(sched, b, 16)
    at_16 = sched.bm.block_hash(b, 16)
    assert a.status is SequenceStatus.FINISHED and at_16 in sched.keeper.snapshots   # a kept it
    decode_to(sched, b, 20)
    assert at_16 in sched.keeper.snapshots and sched.bm.block_hash(b, 20) in sched.keeper.snapshots


def test_state_row_copies_apply_in_order_a_row_written_then_read():
    spec = Qwen3_5Config.from_dict(QWEN3_5).linear_attention
    state = LinearAttentionState.allocate(spec, 8, torch.float32, "cpu")
    for row in range(8):
        state.conv[row], state.recurrent[row] = row, 10 * row
    copy_state_rows([torch.zeros(1), state], [(0, 4), (4, 1), (2, 4), (3, 5), (5, 6)])
    assert [int(state.conv[row, 0, 0]) for row in range(8)] == [0, 0, 2, 3, 2, 3, 3, 7]
    assert [int(state.recurrent[row, 0, 0, 0]) for row in range(8)] == [
        0, 0, 20, 30, 20, 30, 30, 70]
