"""Triton kernels and their plain-PyTorch references (no engine imports).

`get_sampling_ops` picks the implementation of the sampling step: the Triton kernels
(sampling.py, penalties.py, logprobs.py) on CUDA, the PyTorch reference (sampling_ref.py)
elsewhere. Both take and return the same tensors; see sampling_ref.py for the semantics.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "POKESERVE_SAMPLER"


@dataclass(frozen=True)
class SamplingOps:
    """The four sampling-step functions of one backend ("torch" or "triton")."""

    name: str
    apply_penalties: Callable[..., None]
    apply_logit_bias: Callable[..., None]
    sample: Callable[..., torch.Tensor]
    logprobs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _choose(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"sampler backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        has_triton = importlib.util.find_spec("triton") is not None
        return "triton" if device.type == "cuda" and has_triton else "torch"
    return backend


def _triton_ops(device: torch.device) -> SamplingOps:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("sampler backend 'triton' needs the triton package, which is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"sampler backend 'triton' on device {device.type!r} needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 in the environment before triton is imported")
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
