"""Triton kernels and their plain-PyTorch references (no engine imports).

`get_sampling_ops` picks the implementation of the sampling step: the Triton kernels
(sampling.py, penalties.py, logprobs.py) on CUDA, the PyTorch reference (sampling_ref.py)
elsewhere. Both take and return the same tensors; see sampling_ref.py for the semantics.
`get_lora_ops` does the same for the segmented LoRA product of steps that mix adapters
(lora.py, and lora_ref.py for its semantics), by the same rule.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "POKESERVE_SAMPLER"
LORA_ENV_VAR = "POKESERVE_LORA_KERNELS"


@dataclass(frozen=True)
class SamplingOps:
    """The four sampling-step functions of one backend ("torch" or "triton")."""

    name: str
    apply_penalties: Callable[..., None]
    apply_logit_bias: Callable[..., None]
    sample: Callable[..., torch.Tensor]
    logprobs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoraOps:
    """The segmented LoRA product of one backend ("torch" or "triton"): see lora_ref.py.
    `lookup` (an embedding adapter's gather) is plain PyTorch in both. `factor_dtype`: the
    dtype the stacked factors are held in (None: the model's)."""

    name: str
    shrink: Callable[..., torch.Tensor]
    expand: Callable[..., None]
    lookup: Callable[..., torch.Tensor]
    factor_dtype: torch.dtype | None


def _choose(backend: str, device: torch.device, what: str = "sampler",
            env_var: str = ENV_VAR) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what} backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(env_var, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{env_var} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        has_triton = importlib.util.find_spec("triton") is not None
        return "triton" if device.type == "cuda" and has_triton else "torch"
    return backend


def _check_triton(device: torch.device, what: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{what} backend 'triton' needs the triton package, "
                           "which is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{what} backend 'triton' on device {device.type!r} needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 in the environment before triton is imported")


def _triton_ops(device: torch.device) -> SamplingOps:
    _check_triton(device, "sampler")
    from kernels import logprobs, penalties, sampling

    return SamplingOps("triton", penalties.apply_penalties, penalties.apply_logit_bias,
                       sampling.sample, logprobs.logprobs)


def get_sampling_ops(backend: str = "auto", device: torch.device | str = "cpu") -> SamplingOps:
    """The sampling functions for `backend` ("auto" | "triton" | "torch") on `device`.

    "auto" means Triton on CUDA when triton is installed, the reference elsewhere; the
    environment variable POKESERVE_SAMPLER overrides that choice (not an explicit one).
    """
    device = torch.device(device)
    if _choose(backend, device) == "triton":
        return _triton_ops(device)
    from kernels import sampling_ref

    return SamplingOps("torch", sampling_ref.apply_penalties, sampling_ref.apply_logit_bias,
                       sampling_ref.sample, sampling_ref.logprobs)


def get_lora_ops(backend: str = "auto", device: torch.device | str = "cpu") -> LoraOps:
    """The segmented LoRA product for `backend` ("auto" | "triton" | "torch") on `device`:
    as `get_sampling_ops`, with POKESERVE_LORA_KERNELS overriding "auto"."""
    device = torch.device(device)
    from kernels import lora_ref

    if _choose(backend, device, "LoRA", LORA_ENV_VAR) == "triton":
        _check_triton(device, "LoRA")
        from kernels import lora

        return LoraOps("triton", lora.shrink, lora.expand, lora_ref.lookup, None)
    # float32 factors: on the CPU a batched product of a few rows runs about 3x faster in
    # float32 than in bfloat16 (BENCHMARKS.md, issue 16), and the delta is rounded once.
    return LoraOps("torch", lora_ref.shrink, lora_ref.expand, lora_ref.lookup, torch.float32)
