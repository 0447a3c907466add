"""The CPU float32 linear layer (oneDNN) against float64 matmuls."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import Linear


def reference(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_float32_linear_matches_a_float64_matmul(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    x = torch.randn(96, rows).T                        # a non-contiguous input, as views are
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 200)
    torch.testing.assert_close(out.double(), reference(x, layer), atol=1e-4, rtol=1e-5)


def test_weights_changed_in_place_are_used_at_once():
    # LoRA merges write into the weights: no packed copy of the old ones may linger.
    layer = Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        layer(x)
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x).double(), reference(x, layer), atol=1e-4, rtol=1e-5)
