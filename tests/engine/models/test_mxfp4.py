"""MXFP4 dequantization equals transformers' own, bit for bit, on random packed tensors."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from engine.models.mxfp4 import dequantize_mxfp4

NUM_EXPERTS, OUT, IN = 3, 10, 96        # three groups of 32 per row


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaNs compare too."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_range", [(118, 136), (0, 256)], ids=["realistic", "every-exponent"])
def test_dequantized_weights_are_bit_identical_to_transformers(dtype, scale_range):
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (NUM_EXPERTS, OUT, IN // 32, 16), generator=gen,
                           dtype=torch.uint8)
    scales = torch.randint(*scale_range, (NUM_EXPERTS, OUT, IN // 32), generator=gen,
                           dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
    assert ours.shape == theirs.shape == (NUM_EXPERTS, IN, OUT)     # input-major
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(_bits(ours), _bits(theirs))


def test_nibbles_are_read_low_first_and_scales_unbiased_by_127():
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x71          # low nibble 0x1 = +0.5, high nibble 0x7 = +6.0
    blocks[0, 0, 0, 1] = 0xA8          # low nibble 0x8 = -0.0, high nibble 0xA = -1.0
    scales = torch.tensor([[[127 + 3]]], dtype=torch.uint8)   # times 2**3
    weight = dequantize_mxfp4(blocks, scales, torch.float32)    # [1, 32, 1]
    assert weight[0, :4, 0].tolist() == [4.0, 48.0, -0.0, -8.0]
    assert not weight[0, 4:].any()


def test_mismatched_scales_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 4, 3, 16, dtype=torch.uint8),
                         torch.zeros(2, 4, 2, dtype=torch.uint8))
