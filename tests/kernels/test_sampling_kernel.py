"""The fused Triton sampler against the PyTorch reference (kernels/sampling_ref.py).

Under the CPU interpreter a row costs tens of milliseconds, so shapes are small; the
vocabularies are deliberately not powers of two and span several BLOCK-sized chunks.
"""

from __future__ import annotations

import pytest
import torch

from kernels import sampling
from kernels import sampling_ref as ref
from tests.kernels.helpers import log_probs_row, mixed_params, random_logits, row_params


def seeds_steps(batch: int, device, seed: int = 2024) -> dict[str, torch.Tensor]:
    return {"seeds": torch.full((batch,), seed, dtype=torch.int64, device=device),
            "steps": torch.arange(batch, dtype=torch.int64, device=device)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [257, 1531])
def test_truncation_sets_match_reference_exactly(vocab, dtype, device):
    gen = torch.Generator().manual_seed(vocab)
    logits = random_logits(24, vocab, device, gen, dtype)            # ties and -inf included
    params = mixed_params(24, vocab, device, gen)
    expected = ref.truncation_mask(logits, **params)
    assert torch.equal(sampling.truncation_mask(logits, **params), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_match_reference_for_same_seed_and_step(dtype, device):
    gen = torch.Generator().manual_seed(7)
    logits = random_logits(24, 1000, device, gen, dtype)
    params = mixed_params(24, 1000, device, gen)
    draw = {"seeds": torch.randint(-2**62, 2**62, (24,), generator=gen).to(device),
            "steps": torch.randint(0, 2**40, (24,), generator=gen).to(device)}
    tokens = sampling.sample(logits, **params, **draw)
    assert torch.equal(tokens, ref.sample(logits, **params, **draw))
    assert torch.equal(tokens, sampling.sample(logits, **params, **draw))   # deterministic


def test_greedy_rows_mixed_with_sampled_rows_take_the_first_argmax(device):
    logits = torch.tensor([[0.0, 2.0, 5.0, 5.0, 1.0]] * 4, device=device)
    params = row_params(4, device, temperature=1.0)
    params["temperature"][::2] = 0.0
    tokens = sampling.sample(logits, **params, **seeds_steps(4, device))
    assert tokens[0].item() == tokens[2].item() == 2
    assert torch.equal(tokens, ref.sample(logits, **params, **seeds_steps(4, device)))


def test_empirical_frequencies_match_the_truncated_distribution(device):
    draws = 300
    probs = [0.05, 0.5, 0.15, 0.3, 0.0002, 0.0001, 0.0003]          # vocab 7
    logits = log_probs_row(probs).to(device).expand(draws, -1).contiguous()
    params = row_params(draws, device, top_p=0.83)
    tokens = sampling.sample(logits, **params, **seeds_steps(draws, device, seed=99))
    allowed = ref.truncation_mask(logits[:1], **row_params(1, device, top_p=0.83))[0]
    assert allowed.tolist() == [False, True, True, True, False, False, False]
    assert allowed[tokens].all()                                     # nothing outside the set
    expected = torch.tensor(probs, dtype=torch.float64) * allowed.cpu()
    expected = draws * expected / expected.sum()
    observed = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    kept = allowed.cpu()
    chi2 = ((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    assert chi2 < 13.8                                               # chi-square, 2 dof, p = 0.001


def test_no_draw_falls_outside_the_truncation_set(device):
    gen = torch.Generator().manual_seed(3)
    logits = random_logits(32, 613, device, gen)
    params = mixed_params(32, 613, device, gen)
    allowed = ref.truncation_mask(logits, **params)
    for step in range(2):
        draw = {"seeds": torch.arange(32, device=device), "steps": torch.full((32,), step, device=device)}
        tokens = sampling.sample(logits, **params, **draw)
        assert allowed.gather(1, tokens[:, None]).all()


def test_a_row_draws_the_same_token_alone_as_in_any_batch(device):
    gen = torch.Generator().manual_seed(11)
    logits = random_logits(6, 300, device, gen)
    params = row_params(6, device, temperature=0.9, top_p=0.95)
    draw = seeds_steps(6, device)
    draw["steps"].fill_(5)                                           # same seed and step on every row
    batched = sampling.sample(logits, **params, **draw)
    for row in range(6):
        alone = sampling.sample(logits[row:row + 1], **{k: v[row:row + 1] for k, v in params.items()},
                                seeds=draw["seeds"][row:row + 1], steps=draw["steps"][row:row + 1])
        assert alone.item() == batched[row].item()
    shuffled = logits.clone()
    shuffled[1:] = random_logits(5, 300, device, gen)                # other rows change
    assert sampling.sample(shuffled, **params, **draw)[0].item() == batched[0].item()


@pytest.mark.parametrize("case", ["top_p_one", "top_k_above_vocab", "banned_by_bias",
                                  "one_token_has_all_mass", "tiny_temperature", "no_finite_logit"])
def test_edge_cases_match_reference(case, device):
    gen = torch.Generator().manual_seed(5)
    logits = random_logits(8, 200, device, gen)
    params = row_params(8, device, temperature=1.0)
    if case == "top_p_one":
        params["top_p"].fill_(1.0)
    elif case == "top_k_above_vocab":
        params["top_k"].fill_(5000)
    elif case == "banned_by_bias":
        logits[:, :190] = -torch.inf                                 # ten tokens left
    elif case == "one_token_has_all_mass":
        logits[:, 17] = logits.max() + 200.0
    elif case == "tiny_temperature":
        params["temperature"].fill_(1e-4)
    elif case == "no_finite_logit":
        logits[3] = -torch.inf
    draw = seeds_steps(8, device)
    tokens = sampling.sample(logits, **params, **draw)
    assert torch.equal(tokens, ref.sample(logits, **params, **draw))
    assert torch.equal(sampling.truncation_mask(logits, **params), ref.truncation_mask(logits, **params))
    if case == "banned_by_bias":
        assert (tokens >= 190).all()
    elif case == "one_token_has_all_mass":
        assert (tokens == 17).all()
    elif case == "no_finite_logit":
        assert tokens[3].item() == 0
