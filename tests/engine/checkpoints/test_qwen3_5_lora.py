"""LoRA on Qwen3.5: PEFT's adapters over every projection, the training service's split
in_proj_q / in_proj_k / in_proj_v factors against a merge done by hand, and on the MoE
variant its 3-D expert factors, the shared expert, its gate and the router."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoints.adapter import load_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.models.registry import load_model_config
from tests.engine.checkpoints.helpers import (
    assert_merged_alike,
    assert_same_model_outputs,
    engine_logprobs_fn,
    hand_merged_qwen3_moe,
    load_engine_model,
    peft_logprobs_fn,
    save_peft_adapter,
    write_adapter,
)
from tests.engine.checkpoints.test_expert_adapter import (
    TYPICAL,
    expert_factors,
    linear_factors,
)
from tests.engine.models.parity import load_transformers_model

EVERY_PROJECTION = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "q_proj",
                    "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RANK, ALPHA = 4, 8
LINEAR_LAYERS = (0, 1, 2)          # the tiny models' layer 3 is full attention


@pytest.mark.parametrize("family", ["qwen3_5-text", "qwen3_5-vl-tied", "qwen3_5_moe-text"])
def test_peft_adapter_on_every_projection_matches_peft(family, hybrid_model_dirs, tmp_path):
    model_dir = hybrid_model_dirs[family]
    # On the MoE model gate/up/down_proj are the shared expert's (the experts are 3-D tensors).
    targets = EVERY_PROJECTION + (["shared_expert_gate"] if "moe" in family else [])
    adapter = save_peft_adapter(model_dir, tmp_path / "adapter", r=RANK, lora_alpha=ALPHA,
                                targets=targets)
    model = load_engine_model(model_dir)
    LoraManager(model).activate(adapter)
    assert_same_model_outputs(engine_logprobs_fn(model), peft_logprobs_fn(model_dir, adapter))


def split_qkv_factors(model_dir, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The service's layout: in_proj_q and in_proj_k [key_dim rows], in_proj_v [value_dim
    rows] for every linear-attention layer, and the head as `model.unembed_tokens`."""
    spec, hidden = (cfg := load_model_config(model_dir)).linear_attention, cfg.hidden_size
    gen = torch.Generator().manual_seed(3)
    modules = {f"{prefix}layers.{i}.linear_attn.in_proj_{part}": rows for i in LINEAR_LAYERS
               for part, rows in (("q", spec.key_dim), ("k", spec.key_dim), ("v", spec.value_dim))}
    modules["model.unembed_tokens"] = cfg.vocab_size
    tensors = {}
    for module, rows in modules.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, hidden, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, RANK, generator=gen) * 0.1
    return tensors


def hand_merged_logprobs_fn(model_dir, tensors: dict[str, torch.Tensor]):
    """transformers' own model with each factor pair merged into its rows by hand."""
    model = load_transformers_model(model_dir)
    spec = load_model_config(model_dir).linear_attention
    offsets = {"q": (0, spec.key_dim), "k": (spec.key_dim, 2 * spec.key_dim),
               "v": (2 * spec.key_dim, 2 * spec.key_dim + spec.value_dim)}
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith("lora_A.weight")]:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta = ALPHA / RANK * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            if module == "model.unembed_tokens":
                model.lm_head.weight += delta
                continue
            layer, part = int(module.split(".")[2]), module[-1]
            weight = model.model.language_model.layers[layer].linear_attn.in_proj_qkv.weight
            weight[slice(*offsets[part])] += delta

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs


def test_split_qkv_adapter_matches_a_hand_merge_into_the_fused_slices(hybrid_model_dirs, tmp_path):
    model_dir = hybrid_model_dirs["qwen3_5-vl-tied"]
    tensors = split_qkv_factors(model_dir)
    adapter = write_adapter(tmp_path / "service", tensors, {"r": RANK, "lora_alpha": ALPHA})
    model = load_engine_model(model_dir)
    LoraManager(model).activate(adapter)
    assert model.lm_head.weight is not model.embed_tokens.weight    # an adapted head unties
    assert_same_model_outputs(engine_logprobs_fn(model),
                              hand_merged_logprobs_fn(model_dir, tensors))


def test_vision_language_module_names_merge_like_the_text_models(hybrid_model_dirs, tmp_path):
    model_dir = hybrid_model_dirs["qwen3_5-vl-tied"]
    config = {"r": RANK, "lora_alpha": ALPHA}
    text = write_adapter(tmp_path / "text", split_qkv_factors(model_dir), config)
    nested = write_adapter(tmp_path / "nested",
                           split_qkv_factors(model_dir, prefix="model.language_model."), config)
    assert_merged_alike(load_engine_model(model_dir), text, nested)


def test_moe_adapter_on_experts_shared_expert_router_and_mixers_matches_a_hand_merge(
        hybrid_model_dirs, tmp_path):
    model_dir = hybrid_model_dirs["qwen3_5_moe-text"]
    cfg, g = load_model_config(model_dir), torch.Generator().manual_seed(4)
    h, shared, spec = cfg.hidden_size, cfg.intermediate_size, cfg.linear_attention
    tensors = {}
    for layer in range(cfg.num_layers):
        mlp = f"model.layers.{layer}.mlp"
        tensors |= expert_factors(cfg, layer, TYPICAL, RANK, g)
        tensors |= linear_factors(f"{mlp}.gate", cfg.num_experts, h, RANK, g)          # router
        tensors |= linear_factors(f"{mlp}.shared_expert_gate", 1, h, RANK, g)
        for name, out_dim, in_dim in (("gate_proj", shared, h), ("up_proj", shared, h),
                                      ("down_proj", h, shared)):
            tensors |= linear_factors(f"{mlp}.shared_expert.{name}", out_dim, in_dim, RANK, g)
    tensors |= linear_factors("model.layers.0.linear_attn.in_proj_z", spec.value_dim, h, RANK, g)
    tensors |= linear_factors("model.layers.1.linear_attn.out_proj", h, spec.value_dim, RANK, g)
    tensors |= linear_factors("model.layers.3.self_attn.o_proj", h, cfg.q_size, RANK, g)
    tensors |= linear_factors("model.unembed_tokens", cfg.vocab_size, h, RANK, g)
    adapter = write_adapter(tmp_path / "moe", tensors, {"r": RANK, "lora_alpha": ALPHA})
    model = load_engine_model(model_dir)
    LoraManager(model).activate(adapter)
    # transformers holds Qwen3.5-MoE's experts as Qwen3-MoE's: the same hand merge
    assert_same_model_outputs(engine_logprobs_fn(model), hand_merged_qwen3_moe(model_dir, adapter))


@pytest.mark.parametrize("module, rows, message", [
    ("model.layers.3.linear_attn.in_proj_q", 32, "unknown target module"),   # full attention
    ("model.layers.0.self_attn.q_proj", 256, "unknown target module"),       # linear attention
    ("model.layers.0.linear_attn.in_proj_v", 32, "do not fit"),     # key_dim rows: too few
    ("model.layers.0.linear_attn.conv1d", 128, "unknown target module"),
])
def test_adapters_this_model_cannot_take_are_refused_by_name(module, rows, message,
                                                             hybrid_model_dirs, tmp_path):
    model_dir = hybrid_model_dirs["qwen3_5-text"]
    tensors = {f"base_model.model.{module}.lora_A.weight": torch.zeros(RANK, 64),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(rows, RANK)}
    adapter = write_adapter(tmp_path / "bad", tensors, {"r": RANK, "lora_alpha": ALPHA})
    with pytest.raises(CheckpointInvalid, match=message):
        load_adapter(adapter, load_model_config(model_dir))
