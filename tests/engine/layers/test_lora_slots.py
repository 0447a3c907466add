"""A module's adapter slots: each slot adds its own adapter's `scale * x A^T B^T` to its rows
and slice (the oracle: the product written out per row), whatever ranks and slices the
stacks grew to hold, and an emptied slot adds nothing."""

from __future__ import annotations

import torch

from engine.layers.embedding import Embedding
from engine.layers.linear import Linear
from engine.layers.lora import LoraSlots
from kernels import get_lora_ops
from kernels.lora_mapping import NO_SLOT, LoraMapping

IN, OUT = 12, 10
Q, KV = slice(0, 6), slice(6, 10)     # a fused projection's two sub-modules


def factors(rank: int, rows: slice, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, IN, generator=g)
    return a, torch.randn(rows.stop - rows.start, rank, generator=g)


def slots() -> LoraSlots:
    return LoraSlots(3, IN, OUT, torch.float32, torch.device("cpu"), get_lora_ops("torch"))


def test_each_row_gets_its_slot_adapter_in_its_slice_after_the_stacks_grow():
    stacks = slots()
    a0, b0 = factors(2, Q, seed=0)
    stacks.set(0, Q, a0, b0, scale=0.5)
    a1, b1 = factors(5, KV, seed=1)          # a larger rank and a new slice: the stacks grow
    stacks.set(1, KV, a1, b1, scale=2.0)
    a2, b2 = factors(3, Q, seed=2)
    stacks.set(1, Q, a2, b2, scale=1.5)      # slot 1 adapts both slices
    assert (stacks.rank, stacks.slices) == (5, [(0, 6), (6, 10)])
    x, y = torch.randn(4, IN), torch.randn(4, OUT)
    expected = y.clone()
    expected[0, Q] += 0.5 * (x[0] @ a0.T) @ b0.T
    expected[2, KV] += 2.0 * (x[2] @ a1.T) @ b1.T
    expected[2, Q] += 1.5 * (x[2] @ a2.T) @ b2.T
    stacks.add(y, x, LoraMapping.from_row_slots([0, NO_SLOT, 1, NO_SLOT]))
    torch.testing.assert_close(y, expected)


def test_a_slice_that_arrives_after_a_later_one_goes_before_it_and_both_keep_their_adapters():
    stacks = slots()
    a_kv, b_kv = factors(2, KV, seed=8)
    stacks.set(0, KV, a_kv, b_kv, scale=1.0)
    a_q, b_q = factors(3, Q, seed=9)         # a larger rank too: every column moves
    stacks.set(0, Q, a_q, b_q, scale=2.0)
    assert stacks.slices == [(0, 6), (6, 10)]
    x, y = torch.randn(2, IN), torch.randn(2, OUT)
    expected = y.clone()
    expected[1, KV] += (x[1] @ a_kv.T) @ b_kv.T
    expected[1, Q] += 2.0 * (x[1] @ a_q.T) @ b_q.T
    stacks.add(y, x, LoraMapping.from_row_slots([NO_SLOT, 0]))
    torch.testing.assert_close(y, expected)


def test_a_cleared_slot_adds_nothing_and_an_overwritten_one_only_its_new_adapter():
    stacks = slots()
    stacks.set(0, slice(None), *factors(4, slice(0, OUT), seed=3), scale=1.0)
    stacks.set(1, slice(None), *factors(4, slice(0, OUT), seed=4), scale=1.0)
    stacks.clear(1)
    a, b = factors(2, slice(0, OUT), seed=5)
    stacks.set(0, slice(None), a, b, scale=1.0)      # a smaller rank over a larger one
    x, y = torch.randn(2, IN), torch.randn(2, OUT)
    expected = y.clone()
    expected[0] += (x[0] @ a.T) @ b.T
    stacks.add(y, x, LoraMapping.from_row_slots([0, 1]))
    torch.testing.assert_close(y, expected)
    assert stacks.held == [True, False, False]


def test_layers_add_their_slots_only_when_the_step_gives_rows():
    linear = Linear(IN, OUT, bias=False)
    torch.nn.init.normal_(linear.weight)
    linear.lora_slots = slots()
    a, b = factors(3, slice(0, OUT), seed=6)
    linear.lora_slots.set(2, slice(None), a, b, scale=0.25)
    x = torch.randn(2, IN)
    with torch.inference_mode():
        base, mixed = linear(x), linear(x, LoraMapping.from_row_slots([NO_SLOT, 2]))
    torch.testing.assert_close(mixed[1], base[1] + 0.25 * (x[1] @ a.T) @ b.T)
    assert torch.equal(mixed[0], base[0])


def test_an_embedding_slot_adds_its_adapter_row_for_the_token():
    vocab, hidden, rank = 9, 5, 2
    embedding = Embedding(vocab, hidden)
    embedding.lora_slots = LoraSlots(2, vocab, hidden, torch.float32, torch.device("cpu"),
                                     get_lora_ops("torch"))
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(rank, vocab, generator=g), torch.randn(hidden, rank, generator=g)
    embedding.lora_slots.set(1, slice(None), a, b, scale=3.0)
    ids = torch.tensor([4, 4, 8])
    with torch.inference_mode():
        out = embedding(ids, LoraMapping.from_row_slots([1, NO_SLOT, 1]))
    delta = 3.0 * (b @ a).T                                     # [vocab, hidden]
    adapted = torch.tensor([[1.0], [0.0], [1.0]])               # row 1 is the base model's
    torch.testing.assert_close(out, embedding.weight[ids] + delta[ids] * adapted)
