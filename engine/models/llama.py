"""The Llama family: Llama 2/3.x, Qwen2/2.5 (q/k/v bias) and Qwen3 dense (q/k norm).

The three differ only in two switches of `ModelConfig` (`qkv_bias`, `qk_norm`), so one
file serves them. q/k/v and gate/up are fused into one projection each (see
engine.models.causal_lm for where a Hugging Face weight lands inside them).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import LoraTarget, ModelConfig
from engine.layers.activation import silu
from engine.layers.attention import AttentionMetadata, paged_attention, store_kv
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import apply_rotary_
from engine.models.causal_lm import CausalLM
from kernels.lora_mapping import LoraMapping

# Hugging Face module -> (fused module, index of its shard inside the fused one).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def attention_lora_targets(cfg: ModelConfig) -> dict[str, LoraTarget]:
    h = cfg.hidden_size
    return {"self_attn.q_proj": LoraTarget(cfg.q_size, h),
            "self_attn.k_proj": LoraTarget(cfg.kv_size, h),
            "self_attn.v_proj": LoraTarget(cfg.kv_size, h),
            "self_attn.o_proj": LoraTarget(h, cfg.q_size)}


def mlp_lora_targets(hidden: int, intermediate: int) -> dict[str, LoraTarget]:
    return {"mlp.gate_proj": LoraTarget(intermediate, hidden),
            "mlp.up_proj": LoraTarget(intermediate, hidden),
            "mlp.down_proj": LoraTarget(hidden, intermediate)}


class Attention(nn.Module):
    """Self-attention over the paged cache. gpt-oss adds learned per-head `sinks` and, in
    its sliding layers, a `window` (engine.layers.attention)."""

    batch_invariant = False     # set by engine.layers.batch_invariant.enable

    def __init__(self, cfg: ModelConfig, sinks: bool = False, window: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads)) if sinks else None   # [H]
        self.window = window
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg, h, kvh = self.cfg, self.cfg.num_heads, self.cfg.num_kv_heads
        # [T, H + 2 * KVH, D]: the q heads, then the k heads, then the v heads
        qkv = self.qkv_proj(x, meta.lora).view(-1, h + 2 * kvh, cfg.head_dim)
        if cfg.qk_norm:
            qkv[:, :h] = self.q_norm(qkv[:, :h])
            qkv[:, h:h + kvh] = self.k_norm(qkv[:, h:h + kvh])
        apply_rotary_(qkv[:, :h + kvh], *rope)                        # q and k at once, in place
        store_kv(kv_cache, qkv[:, h:], meta.slot_mapping)
        out = paged_attention(qkv[:, :h], kv_cache, meta, self.scale,  # [T, H, D]
                              self.sinks, self.window, self.batch_invariant)
        return self.o_proj(out.flatten(1), meta.lora)


class MLP(nn.Module):
    batch_invariant = False     # set by engine.layers.batch_invariant.enable

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraMapping | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        return self.down_proj(silu(gate, self.batch_invariant) * up, lora)


class DecoderLayer(nn.Module):
    """Attention, then the feed-forward block `mlp` (a dense MLP, or experts), each residual."""

    def __init__(self, cfg: ModelConfig, attention: nn.Module, mlp: nn.Module,
                 norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.input_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x), meta.lora)


class LlamaForCausalLM(CausalLM):
    config_class = ModelConfig
    packed_modules = PACKED_MODULES

    def make_layer(self, cfg: ModelConfig, layer: int) -> DecoderLayer:
        return DecoderLayer(cfg, self.make_attention(cfg, layer), self.make_mlp(cfg, layer),
                            self.norm_class)

    @staticmethod
    def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
        """Layer `layer`'s attention (a family with sinks or sliding layers overrides this)."""
        return Attention(cfg)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        """Layer `layer`'s feed-forward block (a family with experts overrides this)."""
        return MLP(cfg)

    @staticmethod
    def layer_lora_targets(cfg: ModelConfig, layer: int) -> dict[str, LoraTarget]:
        """Layer `layer`'s adaptable modules, by their name inside the layer."""
        return {**attention_lora_targets(cfg),
                **mlp_lora_targets(cfg.hidden_size, cfg.intermediate_size)}

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.cfg
        if fused == "qkv_proj":
            return [c.q_size, c.kv_size, c.kv_size]
        return [c.intermediate_size, c.intermediate_size]
