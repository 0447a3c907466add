"""Block manager: reference counts, prefix caching by chained hashes, eviction order."""

from __future__ import annotations

from pathlib import Path

from engine import block_manager as bm_module
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(tokens, checkpoint=None, **params) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(**params), seed=0, checkpoint=checkpoint)


def run_prefill(bm: BlockManager, seq: Sequence) -> int:
    """Admit seq as the scheduler does and pretend its prompt was computed."""
    cached = bm.allocate_cached_prefix(seq)
    n = seq.num_uncomputed_tokens
    assert bm.can_append(seq, n)
    bm.append_slots(seq, n)
    before = seq.num_computed_tokens
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq, before)
    return cached


def test_append_slots_allocates_ceil_of_tokens_over_block_size():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(9))
    bm.append_slots(seq, 9)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seqs = [make_seq(range(i, i + 7)) for i in range(3)]
    for s in seqs:
        run_prefill(bm, s)
    for s in seqs:
        bm.free_blocks(s)
    assert bm.num_free_blocks == 10
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_shared_prefix_reuses_full_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 99])
    run_prefill(bm, a)
    assert run_prefill(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free_blocks(a)
    bm.free_blocks(b)
    assert bm.num_free_blocks == 10


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_seq(range(8)))
    again = make_seq(range(8))
    assert bm.allocate_cached_prefix(again) == 4  # the last block holds the token to sample from
    assert again.num_uncomputed_tokens == 4


def test_hash_collision_is_caught_by_comparing_token_ids(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda prev, tokens: 42)
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5]))
    assert bm.allocate_cached_prefix(make_seq([5, 6, 7, 8, 9])) == 0


def test_blocks_of_another_checkpoint_are_never_shared():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_seq(range(9)))
    assert bm.allocate_cached_prefix(make_seq(range(9), checkpoint=Path("/ckpt/a"))) == 0
    run_prefill(bm, make_seq(range(9), checkpoint=Path("/ckpt/a")))
    assert bm.allocate_cached_prefix(make_seq(range(9), checkpoint=Path("/ckpt/a"))) == 8


def test_freed_blocks_stay_cached_until_reused_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(range(9))
    run_prefill(bm, first)          # 3 blocks
    bm.free_blocks(first)
    filler = make_seq(range(100, 103))
    bm.append_slots(filler, 3)      # takes the one never-used block
    assert bm.allocate_cached_prefix(make_seq(range(9))) == 8
    big = make_seq(range(200, 216))
    assert not bm.can_append(big, 16)


def test_prompt_logprobs_requests_bypass_the_prefix_cache():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_seq(range(9)))
    assert bm.allocate_cached_prefix(make_seq(range(9), prompt_logprobs=0)) == 0


def test_reused_block_loses_its_old_hash():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(range(5))
    run_prefill(bm, a)
    bm.free_blocks(a)
    b = make_seq(range(50, 58))
    bm.append_slots(b, 8)           # overwrites both blocks
    assert bm.hash_to_block == {}


def test_a_checkpoint_saved_again_in_place_does_not_reuse_the_old_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    ckpt = Path("/ckpt/final")
    run_prefill(bm, make_seq(range(9), checkpoint=ckpt))
    resaved = make_seq(range(9), checkpoint=ckpt)
    resaved.checkpoint_version = 2.0
    assert bm.allocate_cached_prefix(resaved) == 0


def test_a_preempted_sequence_takes_back_the_blocks_of_its_prompt_and_its_output():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(6))
    run_prefill(bm, seq)
    seq.output_ids = [50, 51, 52, 53, 54]                 # decoded; all but the last computed
    bm.append_slots(seq, 4)
    seq.num_computed_tokens = 10
    bm.cache_full_blocks(seq, 6)                           # block 1: prompt 4-5, output 50-51
    table = list(seq.block_table)
    bm.free_blocks(seq)
    seq.reset_for_recompute()
    assert bm.allocate_cached_prefix(seq) == 8 and seq.block_table == table[:2]
