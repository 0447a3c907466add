"""The CPU linear layer (oneDNN, prepacked weight) against float64 matmuls."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import Linear


def reference(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_matches_a_float64_matmul(rows, bias, dtype, tol):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(96, rows).T.to(dtype)                # a non-contiguous input, as views are
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 200)
    torch.testing.assert_close(out.double(), reference(x, layer), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_changed_in_place_are_used_at_once(dtype):
    # Loading and LoRA merges write into the weights: the packed copy must follow.
    layer = Linear(32, 48, bias=False).to(dtype)
    x = torch.randn(4, 32).to(dtype)
    with torch.inference_mode():
        before = layer(x)
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), before * 2)
        layer.weight[:10].zero_()                         # a row slice, as param_slice writes
        assert layer(x)[:, :10].abs().max() == 0


def test_a_new_weight_tensor_is_used_at_once():
    # Untying a LoRA-adapted head swaps in a new Parameter, whose version may match the old.
    layer = Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        before = layer(x)
    new = layer.weight.detach() * 3
    while new._version < layer.weight._version:          # the same version as the old one
        new.mul_(1)
    layer.weight = torch.nn.Parameter(new, requires_grad=False)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), before * 3)
