"""Gated full attention (Qwen3.5, Qwen3-Next) on the paged KV cache.

Three differences from Llama-style attention:
- the query projection yields, per head, the query and an output gate (`[query | gate]`,
  head_dim each), and `sigmoid(gate)` scales each head's attention output before o_proj;
- q and k get a per-head zero-centred RMSNorm before the rotary;
- the rotary turns only the first `rotary_dim` of each head's dimensions (partial rotary).
  Qwen3.5's rotary is multimodal (time, height and width sections); for text every
  section's position is the token's own, so it is the ordinary rotary over those dims.

The projections are fused into one `qkv_proj`: rows [q and gate heads | k heads | v heads].
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import sigmoid
from engine.layers.attention import AttentionMetadata, paged_attention, store_kv
from engine.layers.linear import Linear
from engine.layers.norm import ZeroCenteredRMSNorm
from engine.layers.rotary import apply_rotary_


class GatedAttention(nn.Module):
    batch_invariant = False     # set by engine.layers.batch_invariant.enable

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary_dim: int, eps: float, bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary_dim = rotary_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(hidden_size, 2 * q_size + 2 * kv_size, bias=bias)
        self.o_proj = Linear(q_size, hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(head_dim, eps)
        self.k_norm = ZeroCenteredRMSNorm(head_dim, eps)
        self.scale = head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, hidden]; rope: cos and sin for `rotary_dim` dims -> [T, hidden]."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x, meta.lora)
        query_gate = qkv[:, :2 * h * d].view(-1, h, 2 * d)               # [T, H, 2D]
        kv = qkv[:, 2 * h * d:].view(-1, 2 * kvh, d)                      # [T, 2 * KVH, D]
        q = self.q_norm(query_gate[..., :d])                              # [T, H, D]
        k = self.k_norm(kv[:, :kvh])                                      # [T, KVH, D]
        apply_rotary_(q[..., :self.rotary_dim], *rope)
        apply_rotary_(k[..., :self.rotary_dim], *rope)
        store_kv(kv_cache, torch.cat((k, kv[:, kvh:]), dim=1), meta.slot_mapping)
        out = paged_attention(q, kv_cache, meta, self.scale,              # [T, H, D]
                              batch_invariant=self.batch_invariant)
        gate = sigmoid(query_gate[..., d:], self.batch_invariant)         # [T, H, D]
        return self.o_proj((out * gate).flatten(1), meta.lora)
