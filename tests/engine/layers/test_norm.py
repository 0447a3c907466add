"""Both RMSNorm variants equal transformers' bit for bit in bfloat16, where they differ."""

from __future__ import annotations

import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.layers.norm import Float32WeightRMSNorm, RMSNorm

DIM, EPS = 64, 1e-5


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(32, DIM, generator=gen)).bfloat16()
    weight = (1 + torch.randn(DIM, generator=gen)).bfloat16()
    return x, weight


@torch.no_grad()
def test_float32_weight_rmsnorm_equals_gpt_oss_rmsnorm_in_bfloat16():
    x, weight = _inputs()
    ours = Float32WeightRMSNorm(DIM, EPS).bfloat16()     # the engine casts every weight
    ours.weight.copy_(weight)
    theirs = GptOssRMSNorm(DIM, EPS)                      # transformers keeps it in float32
    theirs.weight.copy_(weight.float())
    out = ours(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, theirs(x))


@torch.no_grad()
def test_llama_rmsnorm_equals_transformers_and_rounds_differently_from_gpt_oss():
    x, weight = _inputs()
    llama, gpt_oss = RMSNorm(DIM, EPS).bfloat16(), Float32WeightRMSNorm(DIM, EPS).bfloat16()
    llama.weight.copy_(weight)
    gpt_oss.weight.copy_(weight)
    theirs = LlamaRMSNorm(DIM, EPS).bfloat16()
    theirs.weight.copy_(weight)
    assert torch.equal(llama(x), theirs(x))
    assert not torch.equal(llama(x), gpt_oss(x))          # one rounding against two
