"""The MXFP4 reference: a packed matrix's product, against the matrix written out by hand.
(Bit-identity with transformers' dequantization: tests/engine/models/test_mxfp4.py.)"""

from __future__ import annotations

import torch

from kernels.mxfp4_ref import dequantize, mxfp4_linear


def test_a_packed_matrix_multiplies_as_its_values_times_their_groups_scale():
    # Two output rows over 64 inputs (two groups each). Row 0: every byte 0x21 (low 0x1
    # = +0.5, high 0x2 = +1.0), group scales 2**0 and 2**2; row 1: byte 0xF9 (low 0x9 =
    # -0.5, high 0xF = -6.0), scales 2**-1 and 2**1.
    blocks = torch.tensor([0x21, 0xF9], dtype=torch.uint8)[:, None, None].expand(2, 2, 16)
    scales = torch.tensor([[127, 129], [126, 128]], dtype=torch.uint8)
    row0 = [0.5, 1.0] * 16 + [2.0, 4.0] * 16
    row1 = [-0.25, -3.0] * 16 + [-1.0, -12.0] * 16
    expected = torch.tensor([row0, row1])                                  # [out 2, in 64]
    assert torch.equal(dequantize(blocks, scales, torch.float32), expected)
    x = torch.randn(3, 64)
    bias = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(mxfp4_linear(x, blocks, scales, bias), x @ expected.T + bias)
