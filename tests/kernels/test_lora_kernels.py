"""The segmented LoRA product: the reference against the definition written row by row, and
the Triton kernels against the reference (through the interpreter on the CPU), with
adapters of different ranks in one batch, empty slots, base rows and fused slices."""

from __future__ import annotations

import pytest
import torch

from kernels import get_lora_ops, lora, lora_ref
from kernels.lora_mapping import NO_SLOT, LoraMapping

K, RANK = 24, 8                       # input size; the stacks' rank (the largest held)
SLICES = [(0, 20), (20, 28), (28, 36)]   # a fused projection: q-, k- and v-like outputs
N = 36
RANKS = {0: 2, 1: 5, 3: 8}            # slot -> rank (slot 2 holds nothing in this batch)


def make_factors(gen: torch.Generator) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """slot -> one (A [r, K], B [n_j, r]) per slice, r the slot's own rank."""
    return {slot: [(torch.randn(r, K, generator=gen), torch.randn(stop - start, r, generator=gen))
                   for start, stop in SLICES] for slot, r in RANKS.items()}


def stack(factors, num_slots: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked layout: A^T [S, K, slices * RANK] and B^T [S, RANK, N], zero-padded."""
    a = torch.zeros(num_slots, K, len(SLICES) * RANK)
    b = torch.zeros(num_slots, RANK, N)
    for slot, parts in factors.items():
        for j, ((start, stop), (fa, fb)) in enumerate(zip(SLICES, parts)):
            a[slot, :, j * RANK:j * RANK + fa.shape[0]] = fa.T
            b[slot, :fb.shape[1], start:stop] = fb.T
    return a, b


def definition(x, y, factors, row_slots) -> torch.Tensor:
    """y + each row's own adapter, one row and one slice at a time, in float64."""
    out = y.double().clone()
    for row, slot in enumerate(row_slots):
        if slot == NO_SLOT:
            continue
        for (start, stop), (fa, fb) in zip(SLICES, factors[slot]):
            out[row, start:stop] += (x[row].double() @ fa.double().T) @ fb.double().T
    return out


# Rows of slots 0, 1 and 3 interleaved with base rows; slot 3 alone has one row.
ROW_SLOTS = [1, NO_SLOT, 0, 0, 1, 3, NO_SLOT, 1, 0, 1, 1]


@pytest.mark.parametrize("row_slots", [ROW_SLOTS, [0, 1, 0, 1, 1]],
                         ids=["gapped-slots", "consecutive-slots"])
def test_reference_matches_the_definition_row_by_row(row_slots):
    gen = torch.Generator().manual_seed(0)
    factors = make_factors(gen)
    a, b = stack(factors)
    x = torch.randn(len(row_slots), K, generator=gen)
    y = torch.randn(len(row_slots), N, generator=gen)
    mapping = LoraMapping.from_row_slots(row_slots)
    expected = definition(x, y, factors, row_slots)
    lora_ref.expand(lora_ref.shrink(x, a, mapping), b, y, mapping, SLICES)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_expand_of_slices_that_do_not_tile_the_output_adds_only_into_them():
    gen = torch.Generator().manual_seed(5)
    slices = [(20, 28), (28, 36)]                     # k- and v-like: q's columns uncovered
    _, b = stack(make_factors(gen))
    mapping = LoraMapping.from_row_slots(ROW_SLOTS)
    t = torch.randn(mapping.num_groups, mapping.max_rows, len(slices) * RANK, generator=gen)
    y = torch.randn(len(ROW_SLOTS), N, generator=gen)
    expected = y.double().clone()
    for g, slot in enumerate(mapping.slot_list):
        for m, row in enumerate(mapping.rows[g, :mapping.lens[g]].tolist()):
            for j, (start, stop) in enumerate(slices):
                expected[row, start:stop] += (t[g, m, j * RANK:(j + 1) * RANK].double()
                                              @ b[slot, :, start:stop].double())
    lora_ref.expand(t, b, y, mapping, slices)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_the_mapping_groups_rows_by_slot_and_inverts_the_grouping():
    mapping = LoraMapping.from_row_slots(ROW_SLOTS)
    assert mapping.slot_list == (0, 1, 3) and mapping.lens.tolist() == [3, 5, 1]
    assert mapping.rows.tolist() == [[2, 3, 8, 0, 0], [0, 4, 7, 9, 10], [5, 0, 0, 0, 0]]
    # Row i's place in rows.flatten(); base rows (1 and 6) one past the 3 x 5 positions.
    assert mapping.inverse.tolist() == [5, 15, 0, 1, 6, 10, 15, 7, 2, 8, 9]


def test_padded_positions_of_t_are_never_read_back():
    gen = torch.Generator().manual_seed(1)
    _, b = stack(make_factors(gen))
    mapping = LoraMapping.from_row_slots(ROW_SLOTS)
    t = torch.randn(mapping.num_groups, mapping.max_rows, len(SLICES) * RANK, generator=gen)
    poisoned = t.clone()
    for g, length in enumerate(mapping.lens.tolist()):
        poisoned[g, length:] = float("nan")
    y = torch.randn(len(ROW_SLOTS), N, generator=gen)
    clean, dirty = y.clone(), y.clone()
    lora_ref.expand(t, b, clean, mapping, SLICES)
    lora_ref.expand(poisoned, b, dirty, mapping, SLICES)
    assert torch.equal(clean, dirty)


def test_float32_factors_round_a_bfloat16_row_once():
    # y = 256 with a delta of 1 + 2^-8: rounded once, 257.0039 goes up to 258 (bfloat16's
    # step is 2 there); a delta rounded to bfloat16 first (1.0) would tie down to 256.
    mapping = LoraMapping.from_row_slots([0])
    a = torch.ones(1, 1, 1)                                 # A^T [S, K, W]
    b = torch.full((1, 1, 1), 1 + 2 ** -8)                  # B^T [S, R, N]
    y = torch.full((1, 1), 256.0, dtype=torch.bfloat16)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    lora_ref.expand(lora_ref.shrink(x, a, mapping), b, y, mapping, [(0, 1)])
    assert y.item() == 258.0


def test_a_batch_without_adapted_rows_has_no_mapping():
    assert LoraMapping.from_row_slots([NO_SLOT, NO_SLOT]) is None


def test_groups_of_consecutive_slots_read_the_stack_without_a_copy():
    stacked = torch.randn(4, 3)
    consecutive = LoraMapping.from_row_slots([2, 1, 2])
    assert consecutive.take(stacked).data_ptr() == stacked[1].data_ptr()
    gapped = LoraMapping.from_row_slots([3, 0])
    assert torch.equal(gapped.take(stacked), stacked[[0, 3]])


def test_embedding_lookup_matches_the_one_hot_product():
    gen = torch.Generator().manual_seed(2)
    vocab, rank = 10, 4
    lora_a = torch.randn(3, vocab, rank, generator=gen)            # A^T of slots 0..2
    ids = torch.tensor([3, 7, 7, 0, 9])
    row_slots = [2, NO_SLOT, 0, 2, 2]
    mapping = LoraMapping.from_row_slots(row_slots)
    t = lora_ref.lookup(ids, lora_a, mapping)
    one_hot = torch.nn.functional.one_hot(ids, vocab).float()
    product = lora_ref.shrink(one_hot, lora_a, mapping)
    assert mapping.lens.tolist() == [1, 3]
    torch.testing.assert_close(t[0, :1], product[0, :1])
    torch.testing.assert_close(t[1], product[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_slots", [ROW_SLOTS, [3] * 20 + [0]], ids=["mixed", "long-group"])
def test_triton_shrink_and_expand_match_the_reference(device, dtype, row_slots):
    gen = torch.Generator().manual_seed(3)
    a, b = (s.to(device, dtype) for s in stack(make_factors(gen)))
    x = torch.randn(len(row_slots), K, generator=gen).to(device, dtype)
    y = torch.randn(len(row_slots), N, generator=gen).to(device, dtype)
    mapping = LoraMapping.from_row_slots(row_slots, device)
    t_ref, t = lora_ref.shrink(x, a, mapping), lora.shrink(x, a, mapping)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    assert t.dtype == t_ref.dtype == dtype
    for g, length in enumerate(mapping.lens.tolist()):    # past a group's rows: unspecified
        torch.testing.assert_close(t[g, :length], t_ref[g, :length], **tol)
    y_ref = y.clone()
    lora_ref.expand(t_ref, b, y_ref, mapping, SLICES)
    lora.expand(t_ref, b, y, mapping, SLICES)
    torch.testing.assert_close(y, y_ref, **tol)


def test_triton_expand_leaves_base_rows_and_uncovered_columns_alone(device):
    gen = torch.Generator().manual_seed(4)
    _, b = (s.to(device) for s in stack(make_factors(gen)))
    row_slots = [NO_SLOT, 0, NO_SLOT, 1]
    mapping = LoraMapping.from_row_slots(row_slots, device)
    t = torch.randn(2, 1, RANK, generator=gen).to(device)
    y = torch.randn(4, N, generator=gen).to(device)
    before = y.clone()
    lora.expand(t, b, y, mapping, [(20, 28)])             # one slice: only the k-like columns
    changed = (y != before).any(dim=0)
    assert torch.equal(y[[0, 2]], before[[0, 2]])
    assert changed[20:28].all() and not changed[:20].any() and not changed[28:].any()


OVERLAPPING = [(0, 36), (0, 20), (20, 28)]   # a whole fused projection beside two parts


def test_triton_expand_launches_overlapping_slices_apart():
    # Within one launch each column of y has one writer: no lost updates on a GPU.
    launches = lora._disjoint_launches(tuple(OVERLAPPING), torch.device("cpu"))
    assert [index.tolist() for index, *_ in launches] == [[0], [1, 2]]
    assert [(starts.tolist(), sizes.tolist(), largest)
            for _, starts, sizes, largest in launches] == [([0], [36], 36), ([0, 20], [20, 8], 20)]


def test_triton_expand_of_overlapping_slices_matches_the_reference(device):
    gen = torch.Generator().manual_seed(6)
    mapping = LoraMapping.from_row_slots(ROW_SLOTS, device)
    t = torch.randn(mapping.num_groups, mapping.max_rows, len(OVERLAPPING) * RANK,
                    generator=gen).to(device)
    b = torch.randn(4, RANK, N, generator=gen).to(device)
    y = torch.randn(len(ROW_SLOTS), N, generator=gen).to(device)
    y_ref = y.clone()
    lora_ref.expand(t, b, y_ref, mapping, OVERLAPPING)
    lora.expand(t, b, y, mapping, OVERLAPPING)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_get_lora_ops_picks_the_reference_on_cpu_and_triton_on_request(monkeypatch):
    monkeypatch.delenv("POKESERVE_LORA_KERNELS", raising=False)
    assert get_lora_ops("auto", "cpu").shrink is lora_ref.shrink
    triton_ops = get_lora_ops("triton", "cpu")            # the interpreter is on in the tests
    assert (triton_ops.name, triton_ops.shrink, triton_ops.expand) == ("triton", lora.shrink,
                                                                       lora.expand)
    assert get_lora_ops("auto", "cuda").name == "triton"
    monkeypatch.setenv("POKESERVE_LORA_KERNELS", "torch")
    assert get_lora_ops("auto", "cuda").name == "torch"
    with pytest.raises(ValueError, match="LoRA backend"):
        get_lora_ops("fast")
