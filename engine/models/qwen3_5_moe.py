"""Qwen3.5-MoE / Qwen3.6-MoE (35B-A3B): Qwen3.5's hybrid layers with experts for every MLP.

Each layer's feed-forward block is a `SparseMoE` (engine.layers.moe: softmax router whose
top k are always renormalised) plus a shared expert: a dense MLP whose output is scaled,
token by token, by `sigmoid(shared_expert_gate(x))` (a [1, H] linear). The attention,
linear attention, norms and checkpoint layouts (text `qwen3_5_moe_text`, vision-language
`qwen3_5_moe`) are Qwen3.5's (engine.models.qwen3_5). Expert weights load from either
layout: one tensor per expert (what transformers' save_pretrained writes) or the fused
`experts.gate_up_proj` / `experts.down_proj` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from engine.config import LoraTarget
from engine.layers.activation import sigmoid
from engine.layers.linear import Linear
from engine.layers.moe import SparseMoE, expert_lora_targets, expert_param_slice, softmax_topk
from engine.models.llama import MLP
from engine.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM
from kernels.lora_mapping import LoraMapping


@dataclass(frozen=True)
class Qwen3_5MoeConfig(Qwen3_5Config):
    """`intermediate_size` is the shared expert's width: the model has no other dense MLP."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "Qwen3_5MoeConfig":
        text = cfg.get("text_config") or cfg
        text = {**text, "intermediate_size": text["shared_expert_intermediate_size"]}
        cfg = {**cfg, "text_config": text} if "text_config" in cfg else text
        return cls(**cls.qwen3_5_fields(cfg, generation_config),
                   num_experts=text["num_experts"], num_experts_per_tok=text["num_experts_per_tok"],
                   moe_intermediate_size=text["moe_intermediate_size"])


class SharedExpertMoE(SparseMoE):
    """The routed experts, plus the shared expert gated per token."""

    batch_invariant = False     # set by engine.layers.batch_invariant.enable

    def __init__(self, cfg: Qwen3_5MoeConfig) -> None:
        router = partial(softmax_topk, top_k=cfg.num_experts_per_tok, renormalize=True)
        super().__init__(cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, router)
        self.shared_expert = MLP(cfg)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraMapping | None = None) -> torch.Tensor:
        """x: [T, H] -> [T, H]. `lora` reaches the router and the shared expert (see
        SparseMoE: adapted experts are served merged)."""
        gate = sigmoid(self.shared_expert_gate(x, lora), self.batch_invariant)  # [T, 1]
        return super().forward(x, lora) + gate * self.shared_expert(x, lora)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    config_class = Qwen3_5MoeConfig

    @staticmethod
    def make_mlp(cfg: Qwen3_5MoeConfig, layer: int) -> nn.Module:
        return SharedExpertMoE(cfg)

    @staticmethod
    def layer_lora_targets(cfg: Qwen3_5MoeConfig, layer: int) -> dict[str, LoraTarget]:
        """Qwen3.5's mixer targets, the router (`mlp.gate`), the experts (3-D targets), the
        shared expert and its gate."""
        dense = Qwen3_5ForCausalLM.layer_lora_targets(cfg, layer)
        experts = expert_lora_targets(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        return {**{name.replace("mlp.", "mlp.shared_expert."): t for name, t in dense.items()},
                "mlp.gate": LoraTarget(cfg.num_experts, cfg.hidden_size),
                "mlp.shared_expert_gate": LoraTarget(1, cfg.hidden_size),
                **{f"mlp.{name}": target for name, target in experts.items()}}

    def param_slice(self, hf_name: str) -> tuple[str, slice | tuple | None]:
        """As Qwen3.5's, plus the experts: `...layers.3.mlp.experts.5.up_proj.weight` ->
        (`layers.3.mlp.experts.gate_up_proj`, expert 5's up rows)."""
        name = self.hf_prefix.sub("", hf_name)
        return (expert_param_slice(name, self.cfg.moe_intermediate_size)
                or super().param_slice(hf_name))
