"""The Triton MXFP4 product against its PyTorch reference (kernels/mxfp4_ref.py), and a
row's bits whatever rows share the launch. Shapes with partial tiles in every dimension:
37 rows (two row tiles under the interpreter's 32), 80 outputs, 96 inputs (one and a
half inner steps)."""

from __future__ import annotations

import pytest
import torch

from kernels import mxfp4, mxfp4_ref
from tests.kernels.helpers import alone
from tests.kernels.test_invariant_kernels import DTYPES, tolerance

M, N, K = 37, 80, 96


def packed(device, seed: int = 0):
    """Random blocks (every byte) and realistic scales (2**-9 to 2**2), and x."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (N, K // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 130, (N, K // 32), generator=gen, dtype=torch.uint8)
    x = torch.randn(M, K, generator=gen)
    return x.to(device), blocks.to(device), scales.to(device)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_packed_product_matches_the_reference(dtype, bias, device):
    x, blocks, scales = packed(device)
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(N, generator=gen).to(dtype).to(device) if bias else None
    out = mxfp4.mxfp4_linear(x, blocks, scales, b)
    assert out.dtype == dtype and out.shape == (M, N)
    expected = mxfp4_ref.mxfp4_linear(x.float(), blocks, scales, None if b is None else b.float())
    torch.testing.assert_close(out.float(), expected, **tolerance(dtype))


def test_each_nibble_meets_its_own_input_and_scale(device):
    """One output row, each input alone: the kernel reads back the dequantized matrix."""
    _, blocks, scales = packed(device, seed=2)
    eye = torch.eye(K, device=device)
    torch.testing.assert_close(mxfp4.mxfp4_linear(eye, blocks, scales).T,
                               mxfp4_ref.dequantize(blocks, scales, torch.float32),
                               atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_alone_and_among_others(dtype, device):
    x, blocks, scales = packed(device, seed=3)
    x = x.to(dtype)
    together = mxfp4.mxfp4_linear(x, blocks, scales)
    for i in (0, 31, 32, 36):
        launch, at = alone(x, i, mxfp4.BLOCK_M)
        assert torch.equal(mxfp4.mxfp4_linear(launch, blocks, scales)[at], together[i])


def test_a_matrix_whose_inputs_are_not_whole_groups_is_refused(device):
    with pytest.raises(ValueError, match="need x"):
        mxfp4.mxfp4_linear(torch.zeros(2, 40, device=device),
                           torch.zeros(3, 1, 16, dtype=torch.uint8, device=device),
                           torch.zeros(3, 1, dtype=torch.uint8, device=device))
