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
NORMS = {  # ours, theirs, how many inputs
    "zero-centred": (ZeroCenteredRMSNorm, Qwen3_5RMSNorm, 1),
    "gated": (GatedRMSNorm, Qwen3_5RMSNormGated, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_norm_with_random_weight_matches_transformers_exactly(norm, dtype):
    ours_class, theirs_class, num_inputs = NORMS[norm]
    gen = torch.Generator().manual_seed(0)
    ours, theirs = ours_class(DIM, 1e-6), theirs_class(DIM, 1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(DIM, generator=gen))
        ours.weight.copy_(theirs.weight)
    inputs = [torch.randn(5, 3, DIM, generator=gen).to(dtype) for _ in range(num_inputs)]
    assert torch.equal(ours.to(dtype)(*inputs), theirs.to(dtype)(*inputs))


def test_l2_normalize_matches_transformers_and_gives_unit_vectors():
    x = torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(2)) * 5
    torch.testing.assert_close(l2_normalize(x), l2norm(x))
    torch.testing.assert_close(l2_normalize(x).norm(dim=-1), torch.ones(4, 3))
