"""Triton logprobs against the reference: log-softmax of the raw logits, top-k in order."""

from __future__ import annotations

import pytest
import torch

from kernels import logprobs as kernel
from kernels import sampling_ref as ref
from tests.kernels.helpers import random_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_logprobs_match_reference(num_top, dtype, device):
    gen = torch.Generator().manual_seed(num_top)
    logits = random_logits(6, 2500, device, gen, dtype)              # three chunks, ties, -inf
    tokens = torch.randint(0, 2500, (6,), generator=gen).to(device)
    chosen, top_ids, top_lp = kernel.logprobs(logits, tokens, num_top)
    ref_chosen, ref_ids, ref_lp = ref.logprobs(logits, tokens, num_top)
    torch.testing.assert_close(chosen, ref_chosen)
    assert torch.equal(top_ids, ref_ids)                             # ties: lower id first
    torch.testing.assert_close(top_lp, ref_lp)
    assert top_ids.shape == (6, num_top) and top_ids.dtype == torch.int64


def test_best_tokens_late_in_the_vocabulary_are_found(device):
    # The running top list must let later chunks displace earlier winners.
    logits = torch.arange(3000, dtype=torch.float32, device=device).repeat(2, 1) / 100.0
    logits[1] = logits[1].flip(0)
    _, top_ids, _ = kernel.logprobs(logits, torch.zeros(2, dtype=torch.long, device=device), 3)
    assert top_ids.tolist() == [[2999, 2998, 2997], [0, 1, 2]]


def test_num_top_out_of_range_is_a_value_error(device):
    logits = torch.zeros(1, 8, device=device)
    with pytest.raises(ValueError, match="num_top"):
        kernel.logprobs(logits, torch.zeros(1, dtype=torch.long, device=device), 21)
