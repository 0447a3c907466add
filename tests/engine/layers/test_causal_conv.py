"""The causal depthwise conv against transformers' PyTorch paths, and its state carried
across any cut of a prompt and into decodes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn, causal_conv1d_update

from engine.layers.causal_conv import causal_conv1d, causal_conv1d_step

CHANNELS, KERNEL = 12, 4


def inputs(num_tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, CHANNELS, generator=gen)
    return x, torch.randn(CHANNELS, KERNEL, generator=gen)


@pytest.mark.parametrize("num_tokens", [1, 2, 9])
def test_a_fresh_prompt_matches_transformers_zero_padded_conv(num_tokens):
    x, weight = inputs(num_tokens)
    out, state = causal_conv1d(x, weight, torch.zeros(CHANNELS, KERNEL - 1))
    want = causal_conv1d_fn(x.T[None], weight, activation="silu")[0].T
    torch.testing.assert_close(out, want)
    padded = torch.cat((torch.zeros(KERNEL - 1, CHANNELS), x))
    assert torch.equal(state, padded[-(KERNEL - 1):].T)             # the last K - 1 inputs


@pytest.mark.parametrize("cuts", [[1], [2, 3], [5], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_a_prompt_cut_anywhere_then_decoded_equals_one_pass(cuts):
    x, weight = inputs(12, seed=1)
    whole, _ = causal_conv1d(x, weight, torch.zeros(CHANNELS, KERNEL - 1))
    state, pieces, bounds = torch.zeros(CHANNELS, KERNEL - 1), [], [0, *cuts, 10]
    for a, b in zip(bounds, bounds[1:]):
        out, state = causal_conv1d(x[a:b], weight, state)
        pieces.append(out)
    for t in (10, 11):                                                # two decodes
        out, states = causal_conv1d_step(x[None, t], weight, state[None])
        state = states[0]
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), whole)


def test_batched_decode_step_matches_transformers_update_per_sequence():
    x, weight = inputs(3, seed=2)
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(3, CHANNELS, KERNEL - 1, generator=gen)
    out, new_states = causal_conv1d_step(x, weight, states)
    hf_states = states.clone()
    want = causal_conv1d_update(x[:, :, None], hf_states, weight, activation="silu")[:, :, 0]
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(new_states, hf_states)                # updated in place there
