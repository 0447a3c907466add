"""The batch-invariant Triton kernels against their PyTorch references, and a row's bits
whatever rows share the launch. (Under the interpreter a tl.dot is numpy's matmul, so
this says nothing of a GPU's summation order: that check is for a machine with one.)"""

from __future__ import annotations

import pytest
import torch

from kernels import invariant_attention, invariant_matmul
from kernels.invariant_attention_ref import invariant_attention as attention_ref
from tests.kernels.helpers import alone
from tests.kernels.test_invariant_attention_ref import HEADS, SCALE, paged_cache

DTYPES = [torch.float32, torch.bfloat16]
LENGTHS = [150, 37, 5]       # two key blocks (the second partial), one, a few keys


def tolerance(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_its_reference(dtype, bias, device):
    gen = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(n, 80, generator=gen).to(dtype).to(device) for n in (70, 100))
    b = torch.randn(100, generator=gen).to(dtype).to(device) if bias else None
    out = invariant_matmul.matmul(x, weight, b)
    assert out.dtype == dtype and out.shape == (70, 100)
    torch.testing.assert_close(out.float(), invariant_matmul.reference(x, weight, b).float(),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_gives_a_row_the_same_bits_alone_and_among_others(dtype, device):
    """Rows 0-69 of one launch (two row tiles, the second partial) against each in a
    launch of its own (helpers.alone)."""
    gen = torch.Generator().manual_seed(1)
    x, weight = (torch.randn(n, 80, generator=gen).to(dtype).to(device) for n in (70, 100))
    together = invariant_matmul.matmul(x, weight)
    for i in (0, 5, 63, 64, 69):
        launch, at = alone(x, i, invariant_matmul.BLOCK_M)
        assert torch.equal(invariant_matmul.matmul(launch, weight)[at], together[i])


def sequences(dtype: torch.dtype, device):
    gen = torch.Generator().manual_seed(2)
    return [tuple(torch.randn(n, heads, 16, generator=gen).to(dtype).to(device)
                  for heads in (HEADS, 2, 2)) for n in LENGTHS]


def attend(fn, seqs, which, num_queries, upto=None, **options):
    """fn (the kernel or the reference) on the last `num_queries` queries of the first
    `upto[i]` tokens of the sequences `which`."""
    cache, tables = paged_cache(seqs, block_size=16)
    cache = cache.to(seqs[0][0].device)
    upto = upto or [seqs[i][0].shape[0] for i in which]
    width = max(len(tables[i]) for i in which)
    padded = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in which],
                          device=cache.device)
    q = torch.stack([seqs[i][0][n - num_queries:n] for i, n in zip(which, upto)])
    return fn(q, cache, padded, torch.tensor(upto, device=cache.device), SCALE, **options)


OPTIONS = {"plain": {}, "sinks-and-window": {"window": 20}}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_its_reference(dtype, options, device):
    seqs = sequences(dtype, device)
    opts = dict(OPTIONS[options])
    if options == "sinks-and-window":
        opts["sinks"] = torch.randn(HEADS, generator=torch.Generator().manual_seed(3)).to(device)
    for which, num_queries in (([0, 1, 2], 1), ([0], LENGTHS[0]), ([1], 30)):
        out = attend(invariant_attention.invariant_attention, seqs, which, num_queries, **opts)
        want = attend(attention_ref, seqs, which, num_queries, **opts)
        torch.testing.assert_close(out.float(), want.float(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_gives_a_query_the_same_bits_however_it_is_launched(dtype, device):
    seqs = sequences(dtype, device)
    kernel = invariant_attention.invariant_attention
    whole = attend(kernel, seqs, [0], LENGTHS[0])[0]                    # one prefill
    halves = torch.cat([attend(kernel, seqs, [0], n, upto=[end])[0]
                        for n, end in ((61, 61), (89, 150))])             # two chunks
    assert torch.equal(halves, whole)
    for i in range(len(LENGTHS)):
        alone = attend(kernel, seqs, [i], 1)[0, 0]
        assert torch.equal(attend(kernel, seqs, [2, i, 0], 1)[1, 0], alone)   # in a group
        assert torch.equal(attend(kernel, seqs, [i], LENGTHS[i])[0, -1], alone)  # in a prefill
