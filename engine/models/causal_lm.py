"""What every family's model shares: tokens to hidden states around its layers, the
logits, tied embeddings, and where a Hugging Face weight lands in a fused projection.

A family subclasses `CausalLM`, which builds `embed_tokens`, the `layers` that the
family's `make_layer` makes (each called as `layer(x, rope, cache, meta)` with its own
cache), the final norm (`norm_class`), `rotary` and `lm_head` (engine.layers' Embedding
and Linear, which add the rows' adapters in a step that mixes checkpoints: `meta.lora`).
The family names its fused projections (`packed_modules`, `_shard_sizes`) and each
layer's adaptable modules (`layer_lora_targets`). The loader and LoRA merging both go
through `param_slice`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.config import LoraTarget, ModelConfig
from engine.layers.attention import AttentionMetadata
from engine.layers.embedding import Embedding
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from kernels.lora_mapping import LoraMapping


class CausalLM(nn.Module):
    # Hugging Face module -> (our fused module, index of its shard inside the fused one).
    packed_modules: dict[str, tuple[str, int]] = {}
    # What Hugging Face puts in front of our parameter names.
    hf_prefix = re.compile(r"^model\.")
    norm_class: type[nn.Module] = RMSNorm   # gpt-oss weighs in float32, Qwen3.5 zero-centred

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def make_layer(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """Decoder layer `layer`."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; caches: one per layer (see
        engine.model_runner.allocate_kv_caches) -> hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids, meta.lora)
        rope = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor,
                       lora: LoraMapping | None = None) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]; `lora`: these n rows by slot."""
        return self.lm_head(hidden, lora).float()

    @classmethod
    def lora_targets(cls, cfg: ModelConfig) -> dict[str, LoraTarget]:
        """The adaptable modules of every layer, by Hugging Face (text model) name (see
        engine.models.registry)."""
        return {f"model.layers.{i}.{name}": target for i in range(cfg.num_layers)
                for name, target in cls.layer_lora_targets(cfg, i).items()}

    @staticmethod
    def layer_lora_targets(cfg: ModelConfig, layer: int) -> dict[str, LoraTarget]:
        """Layer `layer`'s adaptable modules, by their name inside the layer."""
        raise NotImplementedError

    @staticmethod
    def checkpoint_tensor(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in the layout of the parameter it fills: as it is here
        (a family whose checkpoints lay a weight out otherwise overrides this)."""
        return tensor

    @staticmethod
    def hub_tensor(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of `checkpoint_tensor`, for an export (engine.models.hub_weights):
        our parameter's rows in the checkpoint's layout."""
        return tensor

    @classmethod
    def fused_module(cls, hf_module: str) -> str | None:
        """The fused module `hf_module` is a slice of (`packed_modules`), else None:
        `model.layers.0.linear_attn.in_proj_q` -> `model.layers.0.linear_attn.in_proj_qkv`."""
        parent, _, leaf = hf_module.rpartition(".")
        return f"{parent}.{cls.packed_modules[leaf][0]}" if leaf in cls.packed_modules else None

    def param_slice(self, hf_name: str) -> tuple[str, slice | None]:
        """Map a Hugging Face parameter name onto (our parameter name, rows it fills).

        `model.layers.3.self_attn.k_proj.weight` -> (`layers.3.self_attn.qkv_proj.weight`,
        the k rows); unfused names map to themselves with no slice.
        """
        name = self.hf_prefix.sub("", hf_name)
        match = re.search(r"\.(\w+)\.(weight|bias)$", name)
        if not match or match.group(1) not in self.packed_modules:
            return name, None
        fused, shard = self.packed_modules[match.group(1)]
        sizes = self._shard_sizes(fused)
        start = sum(sizes[:shard])
        return (name[:match.start(1)] + fused + "." + match.group(2),
                slice(start, start + sizes[shard]))

    def _shard_sizes(self, fused: str) -> list[int]:
        """The row counts of the shards of one of our fused projections."""
        raise NotImplementedError
