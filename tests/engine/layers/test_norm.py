"""Qwen3.5's norms against transformers' modules, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5RMSNorm,
    Qwen3_5RMSNormGated,
    l2norm,
)

from engine.layers.norm import GatedRMSNorm, ZeroCenteredRMSNorm, l2_normalize

DIM = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centred_rmsnorm_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    ours, theirs = ZeroCenteredRMSNorm(DIM, 1e-6), Qwen3_5RMSNorm(DIM, 1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(DIM, generator=gen))
        ours.weight.copy_(theirs.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(5, 3, DIM, generator=gen).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(1)
    ours, theirs = GatedRMSNorm(DIM, 1e-6), Qwen3_5RMSNormGated(DIM, 1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(DIM, generator=gen))
        ours.weight.copy_(theirs.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, z = (torch.randn(7, DIM, generator=gen).to(dtype) for _ in range(2))
    assert torch.equal(ours(x, z), theirs(x, z))


def test_l2_normalize_matches_transformers_and_gives_unit_vectors():
    x = torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(2)) * 5
    torch.testing.assert_close(l2_normalize(x), l2norm(x))
    torch.testing.assert_close(l2_normalize(x).norm(dim=-1), torch.ones(4, 3))
