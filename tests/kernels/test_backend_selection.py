"""get_sampling_ops picks the backend: reference on CPU, Triton on request or on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kernels import get_sampling_ops, logprobs, penalties, sampling, sampling_ref


def test_auto_on_cpu_is_the_torch_reference(monkeypatch):
    monkeypatch.delenv("POKESERVE_SAMPLER", raising=False)
    ops = get_sampling_ops("auto", "cpu")
    assert ops.name == "torch"
    assert ops.sample is sampling_ref.sample


def test_environment_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("POKESERVE_SAMPLER", "torch")
    assert get_sampling_ops("auto", "cuda").name == "torch"    # no CUDA call is made
    monkeypatch.setenv("POKESERVE_SAMPLER", "triton")
    assert get_sampling_ops("auto", "cpu").name == "triton"    # the interpreter is on here
    assert get_sampling_ops("torch", "cpu").name == "torch"


def test_triton_ops_are_the_kernels(monkeypatch):
    monkeypatch.delenv("POKESERVE_SAMPLER", raising=False)
    ops = get_sampling_ops("triton", "cpu")
    assert (ops.name, ops.sample, ops.logprobs) == ("triton", sampling.sample, logprobs.logprobs)
    assert (ops.apply_penalties, ops.apply_logit_bias) == (penalties.apply_penalties,
                                                           penalties.apply_logit_bias)
    assert get_sampling_ops("auto", "cuda").name == "triton"   # triton is installed here


def test_unknown_backend_names_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="sampler backend"):
        get_sampling_ops("cuda-graphs")
    monkeypatch.setenv("POKESERVE_SAMPLER", "fast")
    with pytest.raises(ValueError, match="POKESERVE_SAMPLER"):
        get_sampling_ops()


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    # A fresh interpreter: this test process already has TRITON_INTERPRET=1.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "POKESERVE_SAMPLER")}
    code = "from kernels import get_sampling_ops; get_sampling_ops('triton', 'cpu')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr
