"""gpt-oss against transformers: the whole model (see parity.py) from bf16-style and MXFP4
checkpoints, and its pieces (router, clamped SwiGLU, expert layout, config rules).

The tiny model (tests/tiny_models.py) has sinks, a sliding layer whose window (8) is
shorter than most prompts followed by a full one, and YaRN over an original context of
64 positions."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.gpt_oss import GptOssForCausalLM, clamped_swiglu, topk_softmax
from engine.models.loader import load_model
from engine.models.registry import load_model_config, parse_model_config
from tests.engine.models.parity import ENGINE_LAYOUTS, assert_engine_matches, transformers_outputs
from tests.tiny_models import gpt_oss_config


@pytest.fixture(scope="module")
def model_dirs(tiny_harmony_model_dir, tiny_gpt_oss_mxfp4_dir):
    return {"dense": tiny_harmony_model_dir, "mxfp4": tiny_gpt_oss_mxfp4_dir}


@pytest.fixture(scope="module")
def oracle(model_dirs):
    # transformers dequantizes MXFP4 itself on a machine without its MXFP4 kernels.
    return {weights: transformers_outputs(path) for weights, path in model_dirs.items()}


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("weights", ["dense", "mxfp4"])
def test_greedy_tokens_and_logprobs_match_transformers(weights, layout, model_dirs, oracle):
    assert_engine_matches(model_dirs[weights], layout, oracle[weights])


def test_mxfp4_experts_load_bit_identical_to_transformers_bfloat16(model_dirs):
    from transformers import AutoModelForCausalLM

    ours = load_model(model_dirs["mxfp4"], load_model_config(model_dirs["mxfp4"]), "cpu",
                      torch.bfloat16, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(model_dirs["mxfp4"], dtype=torch.bfloat16)
    for layer, their_layer in zip(ours.layers, theirs.model.layers):
        experts, their_experts = layer.mlp.experts, their_layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):   # theirs input-major, ours output-major
            assert torch.equal(getattr(experts, name), getattr(their_experts, name).transpose(1, 2))


def test_an_mxfp4_tensor_without_its_other_half_is_refused(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["mxfp4"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other half.*layers\.1\.mlp\.experts\.down_proj_blocks"):
        load_model(broken, load_model_config(broken), "cpu", torch.float32, progress=False)


def test_clamped_swiglu_equals_transformers_experts_gate():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    theirs = GptOssExperts(gpt_oss_config())
    gate_up = 6 * torch.randn(50, 2 * theirs.intermediate_size)     # beyond the limit of 7
    ours = clamped_swiglu(gate_up, limit=theirs.limit, alpha=theirs.alpha)
    assert (gate_up.abs() > theirs.limit).any()
    torch.testing.assert_close(ours, theirs._apply_gate(gate_up), atol=0, rtol=0)


def test_router_takes_the_softmax_over_the_top_k_logits_as_transformers_does():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    config = gpt_oss_config(num_local_experts=8, num_experts_per_tok=3)
    router = GptOssTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.bias)
    x = torch.randn(20, config.hidden_size)
    _, want_weights, want_experts = router(x)
    weights, experts = topk_softmax(torch.nn.functional.linear(x, router.weight, router.bias), 3)
    assert torch.equal(experts, want_experts)
    torch.testing.assert_close(weights, want_weights)


@torch.no_grad()
def test_experts_block_loaded_from_transformers_layout_matches_transformers():
    """The router's name, the transposition and the interleaved gate/up rows, on one block."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = gpt_oss_config()
    theirs = GptOssMLP(config)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = GptOssForCausalLM(parse_model_config(config.to_dict()))
    params = dict(model.named_parameters())
    for name, tensor in theirs.state_dict().items():
        hf_name = f"model.layers.0.mlp.{name}"
        ours, index = model.param_slice(hf_name)
        target = params[ours] if index is None else params[ours][index]
        target.copy_(model.checkpoint_tensor(hf_name, tensor))
    x = torch.randn(30, config.hidden_size)
    torch.testing.assert_close(model.layers[0].mlp(x), theirs(x[None])[0][0], atol=1e-5, rtol=1e-5)


def test_layer_types_windows_and_quantization_come_from_the_config():
    fields = gpt_oss_config(num_hidden_layers=4, sliding_window=16, layer_types=None).to_dict()
    del fields["layer_types"]                          # the default: alternate, sliding first
    cfg = parse_model_config(fields)
    assert [cfg.window(i) for i in range(4)] == [16, None, 16, None]
    assert cfg.qkv_bias and cfg.quantization is None
    cfg = parse_model_config({**fields, "layer_types": ["full_attention"] * 4,
                              "quantization_config": {"quant_method": "mxfp4"}})
    assert [cfg.window(i) for i in range(4)] == [None] * 4 and cfg.quantization == "mxfp4"
    with pytest.raises(ValueError, match="'gptq' are not supported"):
        parse_model_config({**fields, "quantization_config": {"quant_method": "gptq"}})
