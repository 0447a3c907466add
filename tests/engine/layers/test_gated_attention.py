"""Gated attention with partial, multimodal rotary against transformers' Qwen3.5 attention:
one sequence prefilled in two chunks and then decoded, on the paged cache."""

from __future__ import annotations

import torch
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5Attention,
    Qwen3_5TextRotaryEmbedding,
)

from engine.layers.attention import AttentionMetadata
from engine.layers.gated_attention import GatedAttention
from engine.layers.rotary import RotaryEmbedding

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4, 2, 16, 4
ROTARY_DIM = 8       # partial_rotary_factor 0.5


def hf_attention() -> tuple[Qwen3_5Attention, Qwen3_5TextRotaryEmbedding]:
    config = Qwen3_5TextConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                         "mrope_interleaved": True})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    attn = Qwen3_5Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn, Qwen3_5TextRotaryEmbedding(config)


def test_chunked_prefill_then_decode_matches_transformers_gated_attention():
    theirs, hf_rotary = hf_attention()
    ours = GatedAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, ROTARY_DIM, eps=1e-6)
    with torch.no_grad():
        ours.qkv_proj.weight.copy_(torch.cat([theirs.q_proj.weight, theirs.k_proj.weight,
                                              theirs.v_proj.weight]))
        ours.o_proj.weight.copy_(theirs.o_proj.weight)
        ours.q_norm.weight.copy_(theirs.q_norm.weight)
        ours.k_norm.weight.copy_(theirs.k_norm.weight)
    rotary = RotaryEmbedding(ROTARY_DIM, 64, 10000.0, None)
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(1))
    kv_cache = torch.zeros(2 * KV_HEADS, 4, BLOCK, HEAD_DIM)
    table = [3, 1]                                             # scattered blocks
    outs = []
    with torch.no_grad():
        for start, end in ((0, 5), (5, 7), (7, 8)):
            positions = torch.arange(start, end)
            slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(slots),
                block_tables=torch.tensor([table]), context_lens=[end], query_lens=[end - start],
                num_decodes=int(end - start == 1), block_size=BLOCK)
            outs.append(ours(x[start:end], rotary(positions, x.dtype), kv_cache, meta))
        cos_sin = hf_rotary(x[None], torch.arange(8)[None])
        want, _ = theirs(x[None], cos_sin, attention_mask=None)
    torch.testing.assert_close(torch.cat(outs), want[0], atol=1e-5, rtol=1e-5)
