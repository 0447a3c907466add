"""gpt-oss with its MXFP4 experts kept packed (`quantization="mxfp4"`, `--quantization
mxfp4`): the checkpoint's bytes held as they are, outputs against transformers under
every cache layout, what gpt-oss-120b then weighs, and what is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from api.cli import build_parser, engine_options, main
from engine.checkpoints.adapter import inspect_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.config import EngineConfig
from engine.models.gpt_oss import GptOssForCausalLM
from engine.models.loader import load_model
from engine.models.registry import load_model_config, parse_model_config
from tests.engine.checkpoints.helpers import (
    PROMPT,
    TOLERANCE,
    assert_same_model_outputs,
    engine_logprobs_fn,
    load_engine_model,
    write_adapter,
)
from tests.engine.checkpoints.test_gpt_oss_adapter import service_adapter
from tests.engine.models.parity import ENGINE_LAYOUTS, assert_engine_matches, transformers_outputs

PACKED_LAYOUTS = {name: {**layout, "quantization": "mxfp4"} for name, layout in {
    **ENGINE_LAYOUTS, "batch-invariant": dict(block_size=4, num_kv_blocks=256,
                                              batch_invariant=True)}.items()}
PROJECTIONS = ("gate_up_proj", "down_proj")


def load_packed(model_dir, dtype=torch.float32):
    return load_model(model_dir, load_model_config(model_dir, "mxfp4"), "cpu", dtype,
                      progress=False)


@pytest.fixture(scope="module")
def oracle(tiny_gpt_oss_mxfp4_dir):
    return transformers_outputs(tiny_gpt_oss_mxfp4_dir)


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_greedy_tokens_and_logprobs_match_transformers(layout, tiny_gpt_oss_mxfp4_dir, oracle):
    assert_engine_matches(tiny_gpt_oss_mxfp4_dir, layout, oracle, PACKED_LAYOUTS)


def test_the_experts_hold_the_checkpoints_bytes_and_dequantize_to_the_loaded_weights(
        tiny_gpt_oss_mxfp4_dir):
    packed = load_packed(tiny_gpt_oss_mxfp4_dir, torch.bfloat16)
    dequantized = load_model(tiny_gpt_oss_mxfp4_dir, load_model_config(tiny_gpt_oss_mxfp4_dir),
                             "cpu", torch.bfloat16, progress=False)
    stored = load_file(tiny_gpt_oss_mxfp4_dir / "model.safetensors")
    for i, (ours, full) in enumerate(zip(packed.layers, dequantized.layers)):
        experts = ours.mlp.experts
        assert not any(p.is_floating_point() and p.dim() == 3 for p in experts.parameters())
        for name in PROJECTIONS:
            for half in ("blocks", "scales"):
                held = getattr(experts, f"{name}_{half}")
                assert held.dtype == torch.uint8
                assert torch.equal(held, stored[f"model.layers.{i}.mlp.experts.{name}_{half}"])
            for e in range(experts.num_experts):
                assert torch.equal(experts.weight(name, e, torch.bfloat16),
                                   getattr(full.mlp.experts, name)[e])


def test_gpt_oss_120b_packed_takes_a_quarter_of_its_bfloat16_bytes():
    """Built on the meta device from gpt-oss-120b's config.json: no memory is spent."""
    config = {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
              "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
              "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128,
              "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
              "max_position_embeddings": 131072, "rope_theta": 150000,
              "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "original_max_position_embeddings": 4096},
              "quantization_config": {"quant_method": "mxfp4"}}

    def weight_bytes(cfg) -> int:   # as loaded in bfloat16: floating tensors 2 bytes
        with torch.device("meta"):
            model = GptOssForCausalLM(cfg)
        return sum(p.numel() * (2 if p.is_floating_point() else p.element_size())
                   for p in model.parameters())

    cfg = parse_model_config(config)
    gib = 1 << 30
    assert weight_bytes(cfg) > 200 * gib                         # dequantized: no one GPU
    assert weight_bytes(cfg.served_with("mxfp4")) < 64 * gib     # packed: one 80 GB card


def test_packing_needs_an_mxfp4_checkpoint_of_a_family_that_has_one(tiny_harmony_model_dir,
                                                                    tiny_model_dirs):
    with pytest.raises(ValueError, match="not in MXFP4"):
        load_model_config(tiny_harmony_model_dir, "mxfp4")
    with pytest.raises(ValueError, match="no packed weights"):
        load_model_config(tiny_model_dirs["llama-gqa-untied"], "mxfp4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")


def test_serve_refuses_the_flag_for_a_model_without_mxfp4_experts(capsys, monkeypatch,
                                                                   tiny_harmony_model_dir):
    monkeypatch.setattr("api.server.serve", lambda *args: pytest.fail("serve started"))
    assert main(["serve", "--model", str(tiny_harmony_model_dir), "--quantization",
                 "mxfp4"]) == 2
    assert "this checkpoint's experts are not in MXFP4" in capsys.readouterr().err


def test_the_cli_flag_asks_for_packed_experts():
    parse = build_parser().parse_args
    assert EngineConfig(**engine_options(parse(["serve", "--quantization", "mxfp4"]))
                        ).quantization == "mxfp4"
    assert EngineConfig(**engine_options(parse(["serve"]))).quantization is None


def test_an_adapter_of_packed_experts_is_refused_by_name(tiny_gpt_oss_mxfp4_dir, tmp_path):
    adapter = service_adapter(tiny_gpt_oss_mxfp4_dir, tmp_path / "adapter")
    inspect_adapter(adapter, load_model_config(tiny_gpt_oss_mxfp4_dir))   # dequantized: fine
    with pytest.raises(CheckpointInvalid, match=r"mlp\.experts\.w\d: this server keeps the "
                                                r"experts in MXFP4 \(--quantization mxfp4\)"):
        inspect_adapter(adapter, load_model_config(tiny_gpt_oss_mxfp4_dir, "mxfp4"))


def test_adapters_of_attention_and_router_serve_on_packed_experts_as_on_dequantized_ones(
        tiny_gpt_oss_mxfp4_dir, tmp_path):
    tensors = load_file(service_adapter(tiny_gpt_oss_mxfp4_dir, tmp_path / "all")
                        / "adapter_model.safetensors")
    adapter = write_adapter(tmp_path / "no-experts",
                            {k: v for k, v in tensors.items() if ".experts." not in k},
                            {"r": 4, "lora_alpha": 8})
    packed, dequantized = load_packed(tiny_gpt_oss_mxfp4_dir), load_engine_model(
        tiny_gpt_oss_mxfp4_dir)
    base = engine_logprobs_fn(packed)(PROMPT)
    for model in (packed, dequantized):
        LoraManager(model).activate(adapter)
    assert (engine_logprobs_fn(packed)(PROMPT) - base).abs().max() > 100 * TOLERANCE
    assert_same_model_outputs(engine_logprobs_fn(packed), engine_logprobs_fn(dequantized))
