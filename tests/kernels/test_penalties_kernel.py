"""Triton penalties and logit bias against the reference, in place on float32 logits."""

from __future__ import annotations

import pytest
import torch

from kernels import penalties as kernel
from kernels import sampling_ref as ref


def test_penalties_match_reference(device):
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 5, 1100                                           # two chunks
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(device)
    prompt = torch.randint(-1, vocab, (batch, 70), generator=gen).to(device)     # -1: padding
    output = torch.randint(-1, 40, (batch, 50), generator=gen).to(device)        # repeats
    repetition = torch.tensor([1.0, 1.3, 0.7, 2.0, 1.0], device=device)
    presence = torch.tensor([0.0, 0.5, -0.3, 1.0, 0.0], device=device)
    frequency = torch.tensor([0.0, 0.2, 0.1, -0.4, 0.0], device=device)
    got, expected = logits.clone(), logits.clone()
    kernel.apply_penalties(got, prompt, output, repetition, presence, frequency)
    ref.apply_penalties(expected, prompt, output, repetition, presence, frequency)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[[0, 4]], logits[[0, 4]])                  # all-off rows untouched
    assert not torch.equal(got[1:4], logits[1:4])


def test_penalties_with_no_prompt_or_output_leave_logits_alone(device):
    logits = torch.randn(2, 50, device=device)
    got = logits.clone()
    empty = torch.empty(2, 0, dtype=torch.long, device=device)
    ones = torch.ones(2, device=device)
    kernel.apply_penalties(got, empty, empty, 2 * ones, ones, ones)
    assert torch.equal(got, logits)


def test_logit_bias_matches_reference_with_duplicates_and_bans(device):
    logits = torch.randn(3, 700, device=device)
    rows = torch.tensor([0, 0, 1, 2, 2, 2], device=device)
    tokens = torch.tensor([5, 5, 699, 0, 350, 351], device=device)
    values = torch.tensor([1.0, 2.5, -torch.inf, -100.0, 3.0, 0.5], device=device)
    got, expected = logits.clone(), logits.clone()
    kernel.apply_logit_bias(got, rows, tokens, values)
    ref.apply_logit_bias(expected, rows, tokens, values)
    torch.testing.assert_close(got, expected)
    assert got[1, 699].item() == -torch.inf


def test_non_float32_logits_are_a_value_error(device):
    logits = torch.zeros(1, 4, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="float32"):
        kernel.apply_logit_bias(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
