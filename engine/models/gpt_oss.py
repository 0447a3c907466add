"""gpt-oss (gpt-oss-20b, gpt-oss-120b): attention with sinks and sliding layers, experts.

Next to the Llama family it differs in five places, each a hook of `LlamaForCausalLM`:
- attention (`make_attention`): biases on q/k/v and o, learned per-head sinks, and a
  sliding window of `sliding_window` tokens in the layers `layer_types` marks
  `sliding_attention` (they alternate with full-attention layers); YaRN rope;
- the norm (`norm_class`): RMSNorm with its weight applied in float32;
- the feed-forward block (`make_mlp`): a `SparseMoE` whose router has a bias and takes
  the softmax over the top-k logits only, and whose experts have biases and a clamped
  SwiGLU over interleaved gate/up rows (`clamped_swiglu`);
- weight names and layouts (`param_slice`, `checkpoint_tensor`): the router is
  `mlp.router` (ours `mlp.gate`); the experts are stored input-major, `gate_up_proj`
  [E, H, 2I] (gate in the even columns, up in the odd ones) and `down_proj` [E, I, H],
  which load transposed into the MoE layer's [E, 2I, H] and [E, H, I], the interleaving
  kept (so the gate is in the even rows); `hub_tensor` transposes them back for an
  export. Hub checkpoints hold the experts in MXFP4, dequantized by the loader
  (engine.models.mxfp4) before they get here, or, with `EngineConfig.quantization`
  "mxfp4", loaded packed as they are (`*_blocks`, `*_scales`: engine.layers.moe); an
  export writes them dequantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from engine.config import LoraTarget, ModelConfig
from engine.layers.activation import sigmoid
from engine.layers.moe import SparseMoE, expert_lora_targets, expert_param_slice
from engine.layers.norm import Float32WeightRMSNorm
from engine.models.llama import Attention, LlamaForCausalLM, attention_lora_targets

SLIDING, FULL = "sliding_attention", "full_attention"
# Expert weights as gpt-oss checkpoints store them (input-major), and the router.
_INPUT_MAJOR = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = ".mlp.router."


@dataclass(frozen=True)
class GptOssModelConfig(ModelConfig):
    num_experts: int
    num_experts_per_tok: int
    swiglu_limit: float
    swiglu_alpha: float
    sliding_window: int | None
    layer_types: tuple[str, ...]     # per layer: SLIDING or FULL
    keep_mxfp4: bool = False         # the experts served packed (EngineConfig.quantization)

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "GptOssModelConfig":
        fields = cls.common_fields(cfg, generation_config)
        if fields["quantization"] not in (None, "mxfp4"):
            raise ValueError(f"gpt_oss checkpoints quantized with {fields['quantization']!r} "
                             "are not supported (only MXFP4 experts, or none)")
        num_layers = fields["num_layers"]
        # transformers' default: sliding layers first, then alternating.
        layer_types = cfg.get("layer_types") or [SLIDING if i % 2 == 0 else FULL
                                                 for i in range(num_layers)]
        bias = cfg.get("attention_bias", True)
        return cls(**{**fields, "qkv_bias": bias, "o_bias": bias},
                   num_experts=cfg["num_local_experts"],
                   num_experts_per_tok=cfg["num_experts_per_tok"],
                   swiglu_limit=cfg.get("swiglu_limit", 7.0),
                   swiglu_alpha=cfg.get("swiglu_alpha", 1.702),
                   sliding_window=cfg.get("sliding_window"),
                   layer_types=tuple(layer_types))

    @property
    def packed_experts(self) -> bool:
        return self.keep_mxfp4

    def served_with(self, quantization: str | None) -> "GptOssModelConfig":
        if quantization is None:
            return self
        if quantization != "mxfp4" or self.quantization != "mxfp4":
            raise ValueError(f"quantization {quantization!r} keeps MXFP4 experts packed, but "
                             "this checkpoint's experts are not in MXFP4")
        return replace(self, keep_mxfp4=True)

    def window(self, layer: int) -> int | None:
        """The span a layer's queries see: `sliding_window` tokens, or all (None)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's router: logits [T, E] -> weights [T, k] float32 and expert ids [T, k],
    the softmax taken over the k largest logits only."""
    top_logits, experts = logits.topk(top_k, dim=-1)                   # [T, k] each
    return top_logits.softmax(dim=-1, dtype=torch.float32), experts


def clamped_swiglu(gate_up: torch.Tensor, batch_invariant: bool = False, *, limit: float,
                   alpha: float) -> torch.Tensor:
    """gpt-oss's activation over interleaved columns: gate_up [n, 2I] -> [n, I].

    The gate (even columns) is clamped from above at `limit`, the up (odd columns) to
    +-limit, and the up is shifted by one: `(up + 1) * gate * sigmoid(alpha * gate)`."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * sigmoid(gate * alpha, batch_invariant))


class GptOssForCausalLM(LlamaForCausalLM):
    config_class = GptOssModelConfig
    norm_class = Float32WeightRMSNorm

    @staticmethod
    def make_attention(cfg: GptOssModelConfig, layer: int) -> nn.Module:
        return Attention(cfg, sinks=True, window=cfg.window(layer))

    @staticmethod
    def make_mlp(cfg: GptOssModelConfig, layer: int) -> nn.Module:
        return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.intermediate_size,
                         router=partial(topk_softmax, top_k=cfg.num_experts_per_tok),
                         activation=partial(clamped_swiglu, limit=cfg.swiglu_limit,
                                            alpha=cfg.swiglu_alpha),
                         router_bias=True, expert_bias=True, mxfp4=cfg.packed_experts)

    @staticmethod
    def layer_lora_targets(cfg: GptOssModelConfig, layer: int) -> dict[str, LoraTarget]:
        """Attention, the router and the experts' projections (3-D: one delta per expert),
        unless the experts are kept packed."""
        experts = ({} if cfg.packed_experts else
                   expert_lora_targets(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts))
        return {**attention_lora_targets(cfg),
                "mlp.router": LoraTarget(cfg.num_experts, cfg.hidden_size),
                **{f"mlp.{name}": target for name, target in experts.items()}}

    @staticmethod
    def checkpoint_tensor(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Expert weights come input-major ([E, in, out]); ours are [E, out, in]."""
        return tensor.transpose(1, 2) if _INPUT_MAJOR.search(hf_name) else tensor

    # An export writes them input-major again: the transposition is its own inverse.
    hub_tensor = checkpoint_tensor

    def param_slice(self, hf_name: str) -> tuple[str, slice | tuple | None]:
        """As Llama's, plus the router's name and the experts' 3-D LoRA targets:
        `model.layers.3.mlp.experts.up_proj.weight` -> (`layers.3.mlp.experts.gate_up_proj`,
        every expert's odd rows)."""
        name = hf_name.removeprefix("model.").replace(_ROUTER, ".mlp.gate.")
        expert = expert_param_slice(name, self.cfg.intermediate_size)
        if expert is None:
            return super().param_slice(name)
        fused, (experts, rows) = expert
        if fused.endswith("gate_up_proj"):   # gate/up interleaved: gate even rows, up odd
            rows = slice(rows.start // self.cfg.intermediate_size, None, 2)
        return fused, (experts, rows)
