"""The reference's Philox uniform is bit-identical to Triton's tl.rand(seed, step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.philox import philox_uniform


@triton.jit
def _rand_kernel(seed_ptr, step_ptr, out_ptr):
    row = tl.program_id(0)     # one scalar draw per row, as the sampler makes it
    tl.store(out_ptr + row, tl.rand(tl.load(seed_ptr + row), tl.load(step_ptr + row)))


def test_philox_uniform_equals_triton_rand_bit_for_bit(device):
    gen = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.tensor([0, -1, 2**63 - 1, -2**63]),
                       torch.randint(-2**62, 2**62, (28,), generator=gen)])
    steps = torch.cat([torch.tensor([0, 2**32 + 5, -7, 10**15]),
                       torch.randint(0, 2**45, (28,), generator=gen)])
    out = torch.empty(32, device=device)
    _rand_kernel[(32,)](seeds.to(device), steps.to(device), out)
    expected = philox_uniform(seeds, steps)
    assert torch.equal(out.cpu(), expected)
    assert expected.min() >= 0.0 and expected.max() < 1.0
    assert expected.unique().numel() == 32
