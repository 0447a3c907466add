"""Builders shared by the kernel tests: per-row sampling parameters and test logits."""

from __future__ import annotations

import math

import torch


def row_params(batch: int, device: torch.device | str = "cpu", *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> dict[str, torch.Tensor]:
    """The truncation parameters of `batch` identical rows, as the sampling ops take them."""
    def full(value, dtype):
        return torch.full((batch,), value, dtype=dtype, device=device)

    return {"temperature": full(temperature, torch.float32), "top_k": full(top_k, torch.int32),
            "top_p": full(top_p, torch.float32), "min_p": full(min_p, torch.float32)}


def log_probs_row(probs: list[float]) -> torch.Tensor:
    """[1, V] logits whose softmax is `probs` (at temperature 1)."""
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


def mixed_params(batch: int, vocab: int, device: torch.device | str,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random per-row parameters covering greedy rows, each truncation alone and combined."""
    temperature = torch.rand(batch, generator=gen) * 1.5 + 0.3
    temperature[::5] = 0.0                                          # some greedy rows
    top_k = torch.randint(1, 64, (batch,), generator=gen, dtype=torch.int32)
    top_k[1::3] = 0                                                  # top-k off
    top_k[2::6] = vocab + 2                                          # above the vocabulary: off
    top_p = torch.rand(batch, generator=gen) * 0.9 + 0.1
    top_p[2::4] = 1.0                                                # top-p off
    min_p = torch.rand(batch, generator=gen) * 0.3
    min_p[::2] = 0.0                                                 # min-p off
    params = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    return {name: t.to(device) for name, t in params.items()}


def random_logits(batch: int, vocab: int, device: torch.device | str, gen: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, V] logits with a realistic spread, many exact ties and some -inf (banned) tokens."""
    logits = torch.randn(batch, vocab, generator=gen) * 2.0
    logits[1::2] = torch.round(logits[1::2] * 4) / 4                 # odd rows: ties everywhere
    logits[:, 1::7] = logits[:, 0:1]                                 # ties with token 0
    logits[:, 3::11] = -torch.inf
    return logits.to(device=device, dtype=dtype)


def alone(x: torch.Tensor, i: int, block_rows: int) -> tuple[torch.Tensor, int]:
    """Row `i` of `x` in a launch of its own, and its index there. On a GPU, alone. Under
    TRITON_INTERPRET a tl.dot is numpy's matmul, which on some CPUs gives a row other
    bits at another place in a matrix (OpenBLAS's float32 microkernels on an AMD EPYC
    Zen 4: rows 6-11 of every 12), so there the row keeps the place it has in its tile
    of `block_rows`, after zero rows: the launch's size and company still differ."""
    if x.device.type == "cuda":
        return x[i:i + 1], 0
    launch = torch.zeros(i % block_rows + 1, *x.shape[1:], dtype=x.dtype, device=x.device)
    launch[-1] = x[i]
    return launch, -1
