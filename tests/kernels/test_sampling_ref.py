"""The PyTorch reference pins the semantics: each expectation here is derived by hand
from the rule in kernels/sampling_ref.py's docstring (vLLM's order and definitions)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import sampling_ref as ref
from kernels.philox import philox_uniform
from tests.kernels.helpers import log_probs_row, row_params

PROBS = [0.05, 0.5, 0.15, 0.3]          # token 1 > token 3 > token 2 > token 0


def kept(logits: torch.Tensor, **params) -> set[int]:
    mask = ref.truncation_mask(logits, **row_params(logits.shape[0], **params))
    return set(mask[0].nonzero().flatten().tolist())


@pytest.mark.parametrize("k, expected", [(1, {0, 2}), (2, {0, 2}), (3, {0, 2, 3}),
                                         (0, {0, 1, 2, 3, 4}), (-1, {0, 1, 2, 3, 4}),
                                         (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_every_token_tied_with_the_kth(k, expected):
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0]])
    assert kept(logits, top_k=k) == expected


@pytest.mark.parametrize("p, expected", [(0.45, {1}), (0.7, {1, 3}), (0.83, {1, 3, 2}),
                                         (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    assert kept(log_probs_row(PROBS), top_p=p) == expected


def test_top_p_renormalises_over_top_k_survivors():
    # Top-3 mass is 0.95: {1, 3} holds 0.8 / 0.95 = 0.84 >= 0.83 of it, but only 0.8 of all.
    assert kept(log_probs_row(PROBS), top_k=3, top_p=0.83) == {1, 3}


def test_top_p_applies_after_temperature():
    # At T=2 the probs become sqrt(PROBS) renormalised: {1, 3} holds only 0.67 < 0.7.
    assert kept(log_probs_row(PROBS), top_p=0.7) == {1, 3}
    assert kept(log_probs_row(PROBS), top_p=0.7, temperature=2.0) == {1, 3, 2}


@pytest.mark.parametrize("min_p, expected", [(0.5, {1, 3}), (0.2, {1, 3, 2}), (0.0, {0, 1, 2, 3})])
def test_min_p_is_relative_to_the_most_likely_token(min_p, expected):
    assert kept(log_probs_row(PROBS), min_p=min_p) == expected


def test_min_p_applies_after_top_p():
    # top-p 0.83 keeps {1, 3, 2} and min-p 0.2 (prob >= 0.1) keeps those three. Had min-p
    # come first, top-p would renormalise over them (0.8 / 0.95 >= 0.83) and keep only {1, 3}.
    assert kept(log_probs_row(PROBS), top_p=0.83, min_p=0.2) == {1, 2, 3}
    assert kept(log_probs_row(PROBS), top_p=0.7, min_p=0.2) == {1, 3}


def test_banned_tokens_are_never_kept():
    logits = torch.tensor([[0.0, -torch.inf, 1.0, -torch.inf]])
    assert kept(logits) == {0, 2}
    assert kept(logits, top_k=4) == {0, 2}


def test_greedy_row_keeps_only_the_lowest_index_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert kept(logits, temperature=0.0) == {1}
    assert ref.sample(logits, **row_params(1, temperature=0.0), seeds=torch.tensor([7]),
                      steps=torch.tensor([0])).item() == 1


def test_draw_is_the_inverse_cdf_of_the_philox_uniform_in_vocab_order():
    # Two equally likely tokens: the rule picks token 0 iff u < 0.5.
    steps = torch.arange(64)
    seeds = torch.full((64,), 1234)
    logits = torch.zeros(64, 2)
    tokens = ref.sample(logits, **row_params(64), seeds=seeds, steps=steps)
    expected = (philox_uniform(seeds, steps) >= 0.5).long()
    assert torch.equal(tokens, expected)
    assert 0 < expected.sum() < 64


def test_empirical_frequencies_match_the_truncated_distribution():
    draws = 20_000
    logits = log_probs_row(PROBS).expand(draws, -1)
    params = row_params(draws, top_p=0.83)                           # keeps {1, 3, 2}
    tokens = ref.sample(logits, **params, seeds=torch.full((draws,), 99), steps=torch.arange(draws))
    freq = torch.bincount(tokens, minlength=4).double() / draws
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3], dtype=torch.float64) / 0.95
    assert freq[0] == 0.0
    assert 0.5 * (freq - expected).abs().sum() < 0.015               # TV; sd ~ 0.004


def test_all_mass_on_one_token_always_draws_it():
    logits = torch.tensor([[0.0, -1e4, -1e4, -1e4]]).expand(256, -1)
    tokens = ref.sample(logits, **row_params(256), seeds=torch.arange(256), steps=torch.arange(256))
    assert torch.all(tokens == 0)


def test_row_without_finite_logit_returns_index_zero():
    logits = torch.full((1, 5), -torch.inf)
    assert ref.sample(logits, **row_params(1), seeds=torch.tensor([1]), steps=torch.tensor([1])).item() == 0


def test_penalties_follow_vllm_order_and_counts():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0], [2.0, -2.0, 1.0, 0.5, 3.0]])
    prompt = torch.tensor([[0, -1], [0, 1]])
    output = torch.tensor([[1, 1, 2], [1, 2, -1]])
    ref.apply_penalties(logits, prompt, output, repetition=torch.tensor([2.0, 1.0]),
                        presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([0.25, 0.0]))
    # Row 0: token 0 seen in the prompt only: 2 / 2; token 1 twice in the output:
    # -2 * 2 - 0.25 * 2 - 0.5; token 2 once: 1 / 2 - 0.25 - 0.5. Row 1: penalties off.
    expected = torch.tensor([[1.0, -5.0, -0.25, 0.5, 3.0], [2.0, -2.0, 1.0, 0.5, 3.0]])
    torch.testing.assert_close(logits, expected)


def test_logit_bias_adds_duplicates_and_bans_with_minus_inf():
    logits = torch.zeros(2, 4)
    ref.apply_logit_bias(logits, rows=torch.tensor([0, 0, 1, 1]), token_ids=torch.tensor([2, 2, 0, 3]),
                         values=torch.tensor([1.5, 1.0, -torch.inf, -100.0]))
    expected = torch.tensor([[0.0, 0.0, 2.5, 0.0], [-torch.inf, 0.0, 0.0, -100.0]])
    torch.testing.assert_close(logits, expected)


def test_logprobs_are_log_softmax_of_raw_logits_with_ties_in_id_order():
    row = [1.0, 3.0, 2.0, 3.0]
    lse = math.log(sum(math.exp(v) for v in row))
    chosen, top_ids, top_lp = ref.logprobs(torch.tensor([row]), torch.tensor([2]), num_top=3)
    assert chosen.item() == pytest.approx(2.0 - lse, abs=1e-6)
    assert top_ids.tolist() == [[1, 3, 2]]
    assert top_lp[0].tolist() == pytest.approx([3.0 - lse, 3.0 - lse, 2.0 - lse], abs=1e-6)
    _, none_ids, none_lp = ref.logprobs(torch.tensor([row]), torch.tensor([2]), num_top=0)
    assert none_ids.shape == (1, 0) and none_lp.shape == (1, 0)
