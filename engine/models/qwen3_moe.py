"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, experts for the MLP.

Attention and the decoder layer are the Llama family's with Qwen3's q/k norm; the
feed-forward block of a layer is a `SparseMoE` (engine.layers.moe: softmax router, top-k
renormalised when `norm_topk_prob`), except in the layers that `mlp_only_layers` lists or
that `decoder_sparse_step` skips, which keep a dense MLP of width `intermediate_size`.

Expert weights load from either layout: one tensor per expert and projection
(`mlp.experts.{e}.gate_proj.weight`: the hub's, and what transformers 5.24's
`save_pretrained` writes, converting back from its fused form), or transformers' fused
in-memory tensors as `state_dict()` gives them (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]), which are the engine's own layout as they are.
The hub's configs name the expert count `num_experts`; transformers 5 writes it as
`num_local_experts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

from torch import nn

from engine.config import LoraTarget, ModelConfig
from engine.layers.moe import SparseMoE, expert_lora_targets, expert_param_slice, softmax_topk
from engine.models.llama import MLP, LlamaForCausalLM, attention_lora_targets

# transformers' fused expert tensors, as `state_dict()` names them: `...mlp.experts.gate_up_proj`
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<fused>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Qwen3MoeModelConfig(ModelConfig):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool             # renormalise the top-k router weights to sum to 1
    mlp_only_layers: tuple[int, ...]
    decoder_sparse_step: int

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "Qwen3MoeModelConfig":
        if cfg.get("use_sliding_window"):
            raise ValueError("qwen3_moe with use_sliding_window=true is not supported")
        return cls(**{**cls.common_fields(cfg, generation_config), "qk_norm": True},
                   # the hub's configs say num_experts; transformers 5 writes num_local_experts
                   num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                   num_experts_per_tok=cfg["num_experts_per_tok"],
                   moe_intermediate_size=cfg["moe_intermediate_size"],
                   norm_topk_prob=cfg.get("norm_topk_prob", False),
                   mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
                   decoder_sparse_step=cfg.get("decoder_sparse_step", 1))

    def is_moe_layer(self, layer: int) -> bool:
        """transformers' rule: experts in every `decoder_sparse_step`-th layer that
        `mlp_only_layers` does not list."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    config_class = Qwen3MoeModelConfig

    @staticmethod
    def make_mlp(cfg: Qwen3MoeModelConfig, layer: int) -> nn.Module:
        if not cfg.is_moe_layer(layer):
            return MLP(cfg)
        router = partial(softmax_topk, top_k=cfg.num_experts_per_tok,
                         renormalize=cfg.norm_topk_prob)
        return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, router)

    @staticmethod
    def layer_lora_targets(cfg: Qwen3MoeModelConfig, layer: int) -> dict[str, LoraTarget]:
        """A MoE layer's targets are attention, the router (`mlp.gate`) and the experts'
        projections, each a 3-D target (one delta per expert)."""
        if not cfg.is_moe_layer(layer):
            return LlamaForCausalLM.layer_lora_targets(cfg, layer)
        experts = expert_lora_targets(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        return {**attention_lora_targets(cfg),
                "mlp.gate": LoraTarget(cfg.num_experts, cfg.hidden_size),
                **{f"mlp.{name}": target for name, target in experts.items()}}

    def param_slice(self, hf_name: str) -> tuple[str, slice | tuple | None]:
        """As Llama's, plus the experts: `model.layers.3.mlp.experts.5.up_proj.weight` ->
        (`layers.3.mlp.experts.gate_up_proj`, expert 5's up rows)."""
        name = hf_name.removeprefix("model.")
        return (expert_param_slice(name, self.cfg.moe_intermediate_size)
                or super().param_slice(hf_name))

    def hub_names(self, names: list[str]) -> list[str]:
        """The hub's names for a base holding `names` (engine.models.hub_weights): one
        tensor per expert and projection, whichever of the two layouts the base has."""
        return [hub for name in names for hub in _per_expert(name, self.cfg.num_experts)]


def _per_expert(name: str, num_experts: int) -> list[str]:
    """`<p>.experts.gate_up_proj` -> every expert's `gate_proj` and `up_proj` weights;
    any other name stays itself."""
    match = _FUSED_EXPERTS.match(name)
    if not match:
        return [name]
    projections = ("gate_proj", "up_proj") if match["fused"] == "gate_up_proj" else ("down_proj",)
    return [f"{match['prefix']}.{e}.{p}.weight" for e in range(num_experts) for p in projections]
