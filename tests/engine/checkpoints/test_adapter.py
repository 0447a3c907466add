"""LoRA merging against the oracle: transformers + PEFT reading the same adapter from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoints.adapter import inspect_adapter, load_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.config import ModelConfig
from engine.models.registry import load_model_config
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    PROMPT,
    TOLERANCE,
    assert_merged_alike,
    assert_same_model_outputs,
    engine_logprobs_fn,
    load_engine_model,
    peft_logprobs_fn,
    save_peft_adapter,
    to_training_service_layout,
    write_adapter,
)

PARITY_CASES = {
    "llama-tied-all-modules-rank-and-alpha-patterns": (
        "llama3-rope-scaling",
        dict(r=8, lora_alpha=16, targets=[*ALL_LINEAR, "lm_head"],
             rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 4}, alpha_pattern={"o_proj": 5})),
    "llama-tied-embedding-and-head": (
        "llama3-rope-scaling", dict(r=4, lora_alpha=8, targets=["embed_tokens", "lm_head", "v_proj"])),
    "qwen3-rslora-all-modules": (
        "qwen3-qk-norm-tied", dict(r=16, lora_alpha=32, targets=[*ALL_LINEAR, "lm_head"], use_rslora=True)),
    "qwen3-rank1-subset": ("qwen3-qk-norm-tied", dict(r=1, lora_alpha=2, targets=["k_proj", "up_proj"])),
    "llama-untied-everything": (
        "llama-gqa-untied", dict(r=8, lora_alpha=8, targets=[*ALL_LINEAR, "lm_head", "embed_tokens"])),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_merged_adapter_matches_peft(case, tiny_model_dirs, tmp_path):
    family, options = PARITY_CASES[case]
    model_dir = tiny_model_dirs[family]
    adapter = save_peft_adapter(model_dir, tmp_path / "adapter", **options)
    model = load_engine_model(model_dir)
    LoraManager(model).activate(adapter)
    assert_same_model_outputs(engine_logprobs_fn(model), peft_logprobs_fn(model_dir, adapter))


def test_adapter_really_changes_the_outputs(tiny_model_dirs, tmp_path):
    # Guards the parity tests: an adapter that the merge ignored would pass them only
    # if the adapter were a no-op, which this shows it is not.
    model_dir = tiny_model_dirs["qwen3-qk-norm-tied"]
    adapter = save_peft_adapter(model_dir, tmp_path / "adapter", targets=[*ALL_LINEAR, "lm_head"])
    base = peft_logprobs_fn(model_dir, None)(PROMPT)
    tuned = peft_logprobs_fn(model_dir, adapter)(PROMPT)
    assert (base - tuned).abs().max() > 100 * TOLERANCE


def test_training_service_layout_gives_the_peft_adapters_outputs(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama-gqa-untied"]
    peft_dir = save_peft_adapter(model_dir, tmp_path / "peft",
                                 targets=[*ALL_LINEAR, "lm_head", "embed_tokens"])
    service_dir = to_training_service_layout(peft_dir, tmp_path / "service")
    model = load_engine_model(model_dir)
    assert_merged_alike(model, peft_dir, service_dir)
    assert_same_model_outputs(engine_logprobs_fn(model), peft_logprobs_fn(model_dir, peft_dir))


@pytest.mark.model
def test_merged_adapter_matches_peft_on_the_default_model(default_model_dir, tmp_path):
    adapter = save_peft_adapter(default_model_dir, tmp_path / "adapter", r=8, lora_alpha=16,
                                targets=[*ALL_LINEAR, "lm_head"], std=0.02,
                                rank_pattern={"layers.0.self_attn.q_proj": 4})
    model = load_engine_model(default_model_dir)
    LoraManager(model).activate(adapter)
    assert_same_model_outputs(engine_logprobs_fn(model), peft_logprobs_fn(default_model_dir, adapter),
                              num_new_tokens=4)


# ---- what the reader accepts and refuses ------------------------------------------------

@pytest.fixture
def llama_cfg(tiny_model_dirs) -> ModelConfig:
    return load_model_config(tiny_model_dirs["llama-gqa-untied"])


def factors(cfg: ModelConfig, module: str, out_dim: int, in_dim: int, r: int = 4) -> dict:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": torch.randn(r, in_dim),
            f"{prefix}.lora_B.weight": torch.randn(out_dim, r)}


def q_proj(cfg: ModelConfig, layer: int = 0, r: int = 4) -> dict:
    return factors(cfg, f"model.layers.{layer}.self_attn.q_proj", cfg.q_size, cfg.hidden_size, r)


CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
MOE = "base_model.model.model.layers.0.mlp.experts.w1"   # the training service's 3-D expert factors


def test_rank_and_alpha_patterns_and_rslora_set_each_modules_scale(llama_cfg, tmp_path):
    tensors = {**q_proj(llama_cfg, 0, r=4), **q_proj(llama_cfg, 1, r=9)}
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"layers.1.self_attn.q_proj": 9},
              "alpha_pattern": {"model.layers.1.self_attn.q_proj": 27}}
    adapter = load_adapter(write_adapter(tmp_path, tensors, config), llama_cfg)
    scales = {m.module: m.scale for m in adapter.modules}
    assert scales == pytest.approx({"model.layers.0.self_attn.q_proj": 8 / 4 ** 0.5,
                                    "model.layers.1.self_attn.q_proj": 27 / 9 ** 0.5})


@pytest.mark.parametrize("tensors, config, message", [
    (lambda c: {f"{MOE}.lora_A.weight": torch.randn(4, 4, c.hidden_size),
                f"{MOE}.lora_B.weight": torch.randn(4, 8, 4)},
     CONFIG, "MoE expert factors, but this llama model has no experts"),
    (lambda c: factors(c, "model.layers.0.self_attn.q_proj", c.q_size + 1, c.hidden_size),
     CONFIG, r"q_proj: lora_A \[4, 64\] / lora_B \[65, 4\] do not fit"),
    (lambda c: q_proj(c, layer=7), CONFIG, "layer 7 does not exist"),
    (lambda c: factors(c, "model.layers.0.self_attn.rotary", 8, 8), CONFIG, "unknown target module"),
    (lambda c: q_proj(c), {**CONFIG, "target_modules": ["q_proj", "qkv"]}, "unknown target module 'qkv'"),
    (lambda c: {k: v for k, v in q_proj(c).items() if "lora_A" in k}, CONFIG, "lora_B is missing"),
    (lambda c: q_proj(c, r=3), CONFIG, "rank 3 but the config says r=4"),
    (lambda c: {**q_proj(c), "base_model.model.lm_head.base_layer.weight": torch.randn(2, 2)},
     CONFIG, "unexpected tensor"),
    (lambda c: q_proj(c), {**CONFIG, "use_dora": True}, "use_dora=true adapters are not supported"),
    (lambda c: q_proj(c), {**CONFIG, "r": 0}, "r must be a positive integer"),
    (lambda c: {}, CONFIG, "holds no LoRA tensors"),
])
def test_unservable_adapters_are_refused_naming_the_problem(tensors, config, message, llama_cfg, tmp_path):
    adapter_dir = write_adapter(tmp_path, tensors(llama_cfg), config)
    with pytest.raises(CheckpointInvalid, match=message):
        inspect_adapter(adapter_dir, llama_cfg)
    with pytest.raises(CheckpointInvalid, match=message):
        load_adapter(adapter_dir, llama_cfg)


def test_corrupt_weights_file_is_refused(llama_cfg, tmp_path):
    adapter_dir = write_adapter(tmp_path, q_proj(llama_cfg), CONFIG)
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])   # truncated, as by a crash mid-write
    with pytest.raises(CheckpointInvalid, match="adapter_model.safetensors is corrupt"):
        inspect_adapter(adapter_dir, llama_cfg)


def test_non_finite_factors_are_refused_when_loaded(llama_cfg, tmp_path):
    tensors = q_proj(llama_cfg)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointInvalid, match="q_proj: the LoRA factors hold NaN or infinite values"):
        load_adapter(write_adapter(tmp_path, tensors, CONFIG), llama_cfg)


def test_unreadable_config_is_refused(llama_cfg, tmp_path):
    adapter_dir = write_adapter(tmp_path, q_proj(llama_cfg), CONFIG)
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointInvalid, match="adapter_config.json is not readable JSON"):
        inspect_adapter(adapter_dir, llama_cfg)


def test_pickled_adapter_is_refused_unless_allowed(llama_cfg, tmp_path):
    tensors = q_proj(llama_cfg)
    reference = load_adapter(write_adapter(tmp_path / "st", tensors, CONFIG), llama_cfg)
    pickled = tmp_path / "bin"
    pickled.mkdir()
    torch.save(tensors, pickled / "adapter_model.bin")
    (pickled / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointInvalid, match="pickle files are refused"):
        inspect_adapter(pickled, llama_cfg)
    adapter = load_adapter(pickled, llama_cfg, allow_pickle=True)
    assert torch.equal(adapter.modules[0].lora_b, reference.modules[0].lora_b)


def test_missing_weights_file_is_refused(llama_cfg, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointInvalid, match="adapter_model.safetensors is missing"):
        inspect_adapter(Path(tmp_path), llama_cfg)
