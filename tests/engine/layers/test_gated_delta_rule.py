"""The gated delta rule against transformers' pure-PyTorch fallbacks, and its two forms
against each other: chunked == recurrent, and a prompt cut anywhere == one pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from engine.layers.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from engine.layers.norm import l2_normalize

HEADS, DK, DV = 3, 8, 16


def random_inputs(num_tokens: int, seed: int = 0, batch: tuple[int, ...] = ()):
    """q, k (unit length), v, g (<= 0), beta in (0, 1): [*batch, T, H, ...], and a state."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*batch, num_tokens, HEADS)
    q = l2_normalize(torch.randn(*shape, DK, generator=gen))
    k = l2_normalize(torch.randn(*shape, DK, generator=gen))
    v = torch.randn(*shape, DV, generator=gen)
    # Decays as the model makes them: -exp(A_log) * softplus(a + dt_bias)
    g = -torch.rand(HEADS, generator=gen) * 4 * F.softplus(torch.randn(*shape, generator=gen))
    beta = torch.rand(*shape, generator=gen)
    state = torch.randn(*batch, HEADS, DK, DV, generator=gen) * 0.5
    return q, k, v, g, beta, state


@pytest.mark.parametrize("num_tokens", [1, 5, 64, 150])
def test_chunked_form_matches_transformers_chunked_fallback(num_tokens):
    q, k, v, g, beta, state = random_inputs(num_tokens)
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=64)
    want, want_final = torch_chunk_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], chunk_size=64, initial_state=state[None],
        output_final_state=True)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, want_final[0], atol=1e-5, rtol=1e-5)


def test_recurrent_form_matches_transformers_recurrent_fallback_for_a_batch_of_decodes():
    q, k, v, g, beta, state = random_inputs(1, batch=(5,))           # 5 sequences, one token each
    out, new_state = recurrent_gated_delta_rule(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0],
                                                state)
    want, want_state = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                        output_final_state=True)
    torch.testing.assert_close(out, want[:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(new_state, want_state, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_chunked_form_equals_the_recurrent_form_token_by_token(chunk_size):
    q, k, v, g, beta, state = random_inputs(37, seed=1)
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=chunk_size)
    step_state, outs = state[None], []
    for t in range(37):
        o, step_state = recurrent_gated_delta_rule(q[None, t], k[None, t], v[None, t], g[None, t],
                                                   beta[None, t], step_state)
        outs.append(o[0])
    torch.testing.assert_close(out, torch.stack(outs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, step_state[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cuts", [[1], [7, 8], [3, 64, 65, 100], [63, 64, 127]])
def test_a_prompt_cut_anywhere_carries_its_state_to_the_same_result(cuts):
    q, k, v, g, beta, _ = random_inputs(130, seed=2)
    state = torch.zeros(HEADS, DK, DV)
    whole, whole_state = chunk_gated_delta_rule(q, k, v, g, beta, state)
    pieces, bounds = [], [0, *cuts, 130]
    for a, b in zip(bounds, bounds[1:]):
        out, state = chunk_gated_delta_rule(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, whole_state, atol=1e-5, rtol=1e-5)
