"""Kernel tests: on a CUDA machine they run the Triton kernels natively; elsewhere through
the Triton interpreter on the CPU (small shapes: the interpreter is slow), which
tests/conftest.py switches on.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
