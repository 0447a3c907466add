"""Kernel tests: on a CUDA machine they run the Triton kernels natively; elsewhere through
the Triton interpreter on the CPU (small shapes: the interpreter is slow).

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set
here, before the test modules of this folder import kernels.sampling and friends.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
