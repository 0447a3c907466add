"""Rotary position embeddings (RoPE), with Llama 3's and YaRN's frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32."""
    freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / freqs
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inv_freq(freqs, theta, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn)")


def rope_attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 otherwise.

    YaRN sharpens attention on a stretched context by scaling q and k (so their dot
    product) by this factor, given outright or derived from `factor` (and DeepSeek's
    `mscale` / `mscale_all_dim`) as in transformers' `_compute_yarn_parameters`."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = (scaling["factor"], scaling.get("mscale"),
                                      scaling.get("mscale_all_dim"))
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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


def _yarn_inv_freq(freqs: torch.Tensor, theta: float, s: dict) -> torch.Tensor:
    # YaRN: dimensions that turn more than `beta_fast` times over the original context
    # keep their frequency (extrapolate), those that turn fewer than `beta_slow` times
    # are divided by `factor` (interpolate), with a linear ramp between the two.
    # (Written in transformers' order of operations, so that the tables match it bit for bit.)
    head_dim, factor, old_len = 2 * len(freqs), s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_turning(turns: float) -> float:   # the dimension that turns `turns` times
        return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001   # avoid dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                         # 1: extrapolate, 0: interpolate
    return 1.0 / (factor * freqs) * (1 - keep) + 1.0 / freqs * keep


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of RoPE, looked up by each token's absolute position (scaled
    by YaRN's attention factor when it applies)."""

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
        attention_factor = rope_attention_factor(self.args[2])
        self.cos.copy_(freqs.cos() * attention_factor)
        self.sin.copy_(freqs.sin() * attention_factor)

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
