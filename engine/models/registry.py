"""The model families, by `config.json`'s `model_type`.

A family is one module of `engine/models/` with a model class. The class names the
config record it reads (`config_class`, `ModelConfig` or a subclass with the family's
own fields) and lists, from that config alone, the modules a LoRA adapter may target
(`lora_targets`), so that a checkpoint can be checked without building the model.
Adding a family is one file and one line of `FAMILIES`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from engine.config import LoraTarget, ModelConfig
from engine.models.gpt_oss import GptOssForCausalLM
from engine.models.llama import LlamaForCausalLM
from engine.models.qwen3_5 import Qwen3_5ForCausalLM
from engine.models.qwen3_5_moe import Qwen3_5MoeForCausalLM
from engine.models.qwen3_moe import Qwen3MoeForCausalLM

FAMILIES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "gpt_oss": GptOssForCausalLM,
    "qwen3_5_text": Qwen3_5ForCausalLM,
    "qwen3_5": Qwen3_5ForCausalLM,        # the hub's vision-language layout; text only here
    "qwen3_5_moe_text": Qwen3_5MoeForCausalLM,
    "qwen3_5_moe": Qwen3_5MoeForCausalLM,
}


def model_class(model_type: str) -> type[nn.Module]:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; "
                         f"supported: {', '.join(FAMILIES)}") from None


def parse_model_config(cfg: dict, generation_config: dict | None = None) -> ModelConfig:
    """The family's config record for a parsed `config.json` (ValueError if unsupported)."""
    return model_class(cfg.get("model_type", "")).config_class.from_dict(cfg, generation_config)


def load_model_config(model_dir: str | Path, quantization: str | None = None) -> ModelConfig:
    """`config.json` of a model directory, with `generation_config.json`'s EOS ids, as
    served with `EngineConfig.quantization`."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    return parse_model_config(cfg, gen).served_with(quantization)


def lora_targets(cfg: ModelConfig) -> dict[str, LoraTarget]:
    """Every module of the served model that an adapter may adapt, by Hugging Face name:
    the family's own, plus the output head and the input embedding that all share."""
    return {**model_class(cfg.model_type).lora_targets(cfg),
            "lm_head": LoraTarget(cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens": LoraTarget(cfg.hidden_size, cfg.vocab_size)}
