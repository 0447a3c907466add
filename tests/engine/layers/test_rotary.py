"""RoPE applied in place, on q and k heads together, equals transformers' formula."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.layers.rotary import RotaryEmbedding, apply_rotary_


def test_in_place_rotation_of_a_strided_view_matches_transformers():
    head_dim, num_heads, num_kv_heads = 8, 4, 2
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None)
    positions = torch.tensor([0, 5, 17, 63])
    # The fused projection's layout: [tokens, q heads + k heads + v heads, head_dim]
    qkv = torch.randn(len(positions), num_heads + 2 * num_kv_heads, head_dim)
    q = qkv[:, :num_heads].clone()
    k = qkv[:, num_heads:num_heads + num_kv_heads].clone()
    v = qkv[:, num_heads + num_kv_heads:].clone()

    apply_rotary_(qkv[:, :num_heads + num_kv_heads], *rotary(positions, torch.float32))

    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)                         # [T, head_dim]
    # transformers' layout: q [batch, heads, T, head_dim], cos and sin [batch, T, head_dim]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(qkv[:, :num_heads], want_q[0].transpose(0, 1))
    torch.testing.assert_close(qkv[:, num_heads:num_heads + num_kv_heads], want_k[0].transpose(0, 1))
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v)        # v heads untouched
