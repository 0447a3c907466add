"""Rotary position embeddings (RoPE), including Llama 3's frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, and blend
    # smoothly in between (wavelengths measured against the original context length).
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of RoPE, looked up by each token's absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.args = (head_dim, theta, scaling)
        # [max_positions, head_dim // 2] each; kept in float32, cast per call.
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """(Re)compute the tables in place, e.g. after the module was built on the meta device."""
        if self.cos.is_meta:
            return
        inv_freq = rope_inv_freq(*self.args).to(self.cos.device)
        positions = torch.arange(self.cos.shape[0], dtype=torch.float32, device=self.cos.device)
        freqs = torch.outer(positions, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `apply_rotary_`: [num_tokens, 1, head_dim] each, in `dtype`.

        Built once per step; sin has its first half negated, which turns Hugging Face's
        `x * cos + rotate_half(x) * sin` into `x * cos + swap_halves(x) * sin`."""
        cos, sin = self.cos[positions], self.sin[positions]                # [T, head_dim // 2]
        return (torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype),
                torch.cat((-sin, sin), dim=-1).unsqueeze(1).to(dtype))


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x: [num_tokens, num_heads, head_dim] in place; x may be a view, such as
    the q and k heads of the fused qkv projection's output, rotated together."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    x.mul_(cos).addcmul_(swapped, sin)
