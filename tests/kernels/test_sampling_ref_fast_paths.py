"""The reference's shortcuts (no sort without top-k/top-p, argmax for all-greedy batches,
no sort without top alternatives) give exactly what the general path gives."""

from __future__ import annotations

import torch

from kernels import sampling_ref as ref
from tests.kernels.helpers import row_params

VOCAB = 1000


def logits(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, VOCAB, generator=gen) * 3
    x[:, ::7] = x[:, :1]              # ties
    x[0, 5] = -torch.inf
    return x


def with_sorting_row(params: dict, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Append a row that needs top-k, which forces the general (sorting) path."""
    extra = row_params(1, top_k=3)
    return ({k: torch.cat([v, extra[k]]) for k, v in params.items()},
            torch.cat([x, x[:1]]))


def test_truncation_without_top_k_or_top_p_equals_the_sorting_path():
    x = logits(4)
    params = row_params(4, temperature=0.8, min_p=0.05)
    params["temperature"][1] = 0.0
    fast = ref.truncation_mask(x, **params)
    general_params, general_x = with_sorting_row(params, x)
    general = ref.truncation_mask(general_x, **general_params)[:4]
    assert torch.equal(fast, general)


def test_all_greedy_batch_draws_the_argmax_like_mixed_batches():
    x = logits(3)
    params = row_params(3, temperature=0.0)
    seeds, steps = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    fast = ref.sample(x, **params, seeds=seeds, steps=steps)
    mixed_params, mixed_x = with_sorting_row(params, x)
    mixed_params["temperature"][-1] = 1.0        # one sampled row: the general path
    general = ref.sample(mixed_x, **mixed_params, seeds=torch.arange(4),
                         steps=torch.zeros(4, dtype=torch.int64))[:3]
    assert torch.equal(fast, general) and torch.equal(fast, x.argmax(-1))


def test_logprobs_without_alternatives_match_the_chosen_column_with_them():
    x = logits(3)
    tokens = torch.tensor([1, 2, 3])
    chosen0, ids0, lps0 = ref.logprobs(x, tokens, 0)
    chosen5, _, _ = ref.logprobs(x, tokens, 5)
    assert ids0.shape == (3, 0) and lps0.shape == (3, 0)
    assert torch.equal(chosen0, chosen5)
