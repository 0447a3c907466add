"""Qwen3.5 / Qwen3.6 (dense): three of every four layers Gated DeltaNet, the fourth gated attention.

`layer_types` says which layer is which: `linear_attention` layers keep a fixed-size state
per sequence in a state slot (engine.layers.linear_attention), `full_attention` layers
attend over the paged KV cache with an output gate, q/k norm and partial rotary
(engine.layers.gated_attention). Every other norm is zero-centred (`x * (1 + w)`).

Two checkpoint layouts load: the text model (`qwen3_5_text`, weights `model.*`) and the
hub's vision-language one (`qwen3_5`: `text_config` in config.json, text weights under
`model.language_model.*`; the loader skips the vision tower `model.visual.*` and the
multi-token-prediction head `mtp.*`, as transformers does, without reading them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from engine.config import LinearAttentionSpec, LoraTarget, ModelConfig
from engine.layers.gated_attention import GatedAttention
from engine.layers.linear_attention import GatedDeltaNet
from engine.layers.norm import ZeroCenteredRMSNorm
from engine.models import llama
from engine.models.causal_lm import CausalLM
from engine.models.llama import MLP

LINEAR_ATTENTION = "linear_attention"
# Llama's fused projections, and the linear attention's in_proj_q/k/v: these exist only in
# the training service's adapters, as LoRA factors for the slices of the fused in_proj_qkv.
PACKED_MODULES = {**llama.PACKED_MODULES, "in_proj_q": ("in_proj_qkv", 0),
                  "in_proj_k": ("in_proj_qkv", 1), "in_proj_v": ("in_proj_qkv", 2)}


@dataclass(frozen=True)
class Qwen3_5Config(ModelConfig):
    layer_types: tuple[str, ...]
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    partial_rotary_factor: float

    @property
    def linear_attention(self) -> LinearAttentionSpec:
        return LinearAttentionSpec(
            layers=tuple(i for i, kind in enumerate(self.layer_types) if kind == LINEAR_ATTENTION),
            num_key_heads=self.linear_num_key_heads, num_value_heads=self.linear_num_value_heads,
            key_head_dim=self.linear_key_head_dim, value_head_dim=self.linear_value_head_dim,
            conv_kernel=self.linear_conv_kernel_dim)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "Qwen3_5Config":
        return cls(**cls.qwen3_5_fields(cfg, generation_config))

    @classmethod
    def qwen3_5_fields(cls, cfg: dict, generation_config: dict | None = None) -> dict:
        """The fields of a text or vision-language config.json (the latter nests the text
        model's under `text_config`; its own `tie_word_embeddings` is the one that counts)."""
        text = cfg.get("text_config") or cfg
        fields = cls.common_fields(text, generation_config)
        fields.update(model_type=cfg["model_type"],
                      tie_word_embeddings=cfg.get("tie_word_embeddings", False))
        interval = text.get("full_attention_interval", 4)
        layer_types = text.get("layer_types") or [
            "full_attention" if (i + 1) % interval == 0 else LINEAR_ATTENTION
            for i in range(text["num_hidden_layers"])]
        rope = text.get("rope_parameters") or {}
        return fields | dict(
            layer_types=tuple(layer_types),
            linear_num_key_heads=text.get("linear_num_key_heads", 16),
            linear_num_value_heads=text.get("linear_num_value_heads", 32),
            linear_key_head_dim=text.get("linear_key_head_dim", 128),
            linear_value_head_dim=text.get("linear_value_head_dim", 128),
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            partial_rotary_factor=rope.get("partial_rotary_factor",
                                           text.get("partial_rotary_factor", 0.25)))


class DecoderLayer(nn.Module):
    """A token mixer (Gated DeltaNet or gated attention, by `layer_types`), then the
    feed-forward block `mlp` (a dense MLP, or experts), each residual."""

    def __init__(self, cfg: Qwen3_5Config, index: int, mlp: nn.Module) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.is_linear = index in cfg.linear_attention.layers
        self.input_layernorm = ZeroCenteredRMSNorm(h, eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(h, cfg.linear_attention, eps)
        else:
            self.self_attn = GatedAttention(h, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                            cfg.rotary_dim, eps, bias=cfg.qkv_bias)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(h, eps)
        self.mlp = mlp

    def forward(self, x, rope, cache, meta):
        """cache: a LinearAttentionState for a linear-attention layer, else the KV cache."""
        mixed = self.input_layernorm(x)
        x = x + (self.linear_attn(mixed, cache, meta) if self.is_linear
                 else self.self_attn(mixed, rope, cache, meta))
        return x + self.mlp(self.post_attention_layernorm(x), meta.lora)


class Qwen3_5ForCausalLM(CausalLM):
    config_class = Qwen3_5Config
    packed_modules = PACKED_MODULES
    hf_prefix = re.compile(r"^model\.(language_model\.)?")    # text or vision-language layout

    norm_class = ZeroCenteredRMSNorm

    def make_layer(self, cfg: Qwen3_5Config, layer: int) -> DecoderLayer:
        return DecoderLayer(cfg, layer, self.make_mlp(cfg, layer))

    @staticmethod
    def make_mlp(cfg: Qwen3_5Config, layer: int) -> nn.Module:
        """Layer `layer`'s feed-forward block (the MoE variant overrides this)."""
        return MLP(cfg)

    @staticmethod
    def layer_lora_targets(cfg: Qwen3_5Config, layer: int) -> dict[str, LoraTarget]:
        """Layer `layer`'s adaptable modules, by their name inside the layer: the fused
        in_proj_qkv, or its q, k and v slices apart, as the training service has them."""
        h, m, spec = cfg.hidden_size, cfg.intermediate_size, cfg.linear_attention
        shapes = {"mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
        if layer in spec.layers:
            kd, vd, hv = spec.key_dim, spec.value_dim, spec.num_value_heads
            shapes |= {f"linear_attn.{name}": dims for name, dims in (
                ("in_proj_qkv", (2 * kd + vd, h)), ("in_proj_q", (kd, h)), ("in_proj_k", (kd, h)),
                ("in_proj_v", (vd, h)), ("in_proj_z", (vd, h)), ("in_proj_a", (hv, h)),
                ("in_proj_b", (hv, h)), ("out_proj", (h, vd)))}
        else:
            q, kv = cfg.q_size, cfg.kv_size
            shapes |= {"self_attn.q_proj": (2 * q, h), "self_attn.k_proj": (kv, h),
                       "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q)}
        return {name: LoraTarget(*dims) for name, dims in shapes.items()}

    def _shard_sizes(self, fused: str) -> list[int]:
        c, spec = self.cfg, self.cfg.linear_attention
        if fused == "qkv_proj":
            return [2 * c.q_size, c.kv_size, c.kv_size]
        if fused == "in_proj_qkv":
            return [spec.key_dim, spec.key_dim, spec.value_dim]
        return [c.intermediate_size, c.intermediate_size]
