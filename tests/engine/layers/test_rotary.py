"""RoPE applied in place, on q and k heads together, equals transformers' formula."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.layers.rotary import (
    RotaryEmbedding,
    apply_rotary_,
    rope_attention_factor,
    rope_inv_freq,
)


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


GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("yarn", [
    GPT_OSS_YARN,
    {**GPT_OSS_YARN, "truncate": True, "factor": 4.0, "original_max_position_embeddings": 64},
    {**GPT_OSS_YARN, "attention_factor": 1.25, "beta_fast": 8.0, "beta_slow": 2.0},
    {**GPT_OSS_YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "factor": 40.0},   # DeepSeek's form
], ids=["gpt-oss", "truncated", "attention-factor", "mscale"])
def test_yarn_tables_equal_transformers_gpt_oss_rotary_embedding(yarn):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    head_dim, max_positions, theta = 64, 1024, 150000.0
    config = GptOssConfig(head_dim=head_dim, hidden_size=256, num_attention_heads=4,
                          max_position_embeddings=max_positions,
                          rope_parameters={**yarn, "rope_theta": theta})
    theirs = GptOssRotaryEmbedding(config)
    positions = torch.arange(max_positions)
    want_cos, want_sin = theirs(torch.zeros(1, dtype=torch.float32), positions[None])  # [1, T, D/2]

    ours = RotaryEmbedding(head_dim, max_positions, theta, dict(yarn))
    assert torch.equal(rope_inv_freq(head_dim, theta, dict(yarn)), theirs.inv_freq)
    assert rope_attention_factor(dict(yarn)) == theirs.attention_scaling != 1.0
    cos, sin = ours(positions, torch.float32)                           # [T, 1, D]
    assert torch.equal(cos[:, 0, :head_dim // 2], want_cos[0])
    assert torch.equal(sin[:, 0, head_dim // 2:], want_sin[0])


def test_yarn_rotation_matches_transformers_gpt_oss_attention_rotation():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import (
        GptOssRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    head_dim, num_heads, theta = 16, 3, 150000.0
    config = GptOssConfig(head_dim=head_dim, hidden_size=48, num_attention_heads=num_heads,
                          max_position_embeddings=512,
                          rope_parameters={**GPT_OSS_YARN, "rope_theta": theta})
    positions = torch.tensor([0, 3, 100, 511])
    cos, sin = GptOssRotaryEmbedding(config)(torch.zeros(1), positions[None])   # [1, T, D/2]
    x = torch.randn(len(positions), num_heads, head_dim)
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
    apply_rotary_(x, *RotaryEmbedding(head_dim, 512, theta, dict(GPT_OSS_YARN))(positions,
                                                                            torch.float32))
    torch.testing.assert_close(x, want[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
