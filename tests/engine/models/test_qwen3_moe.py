"""Qwen3-MoE against transformers (see parity.py), from either layout of expert weights;
the layers that are dense and the config fields that decide it."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.layers.moe import SparseMoE
from engine.models.qwen3_moe import Qwen3MoeForCausalLM
from engine.models.registry import parse_model_config
from tests.engine.checkpoints.helpers import load_engine_model
from tests.engine.models.parity import ENGINE_LAYOUTS, assert_engine_matches, transformers_outputs


@pytest.fixture(scope="module")
def oracle(tiny_moe_model_dirs):
    return transformers_outputs(tiny_moe_model_dirs["hub"])


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("weights", ["hub", "fused"])
def test_greedy_tokens_and_logprobs_match_transformers(weights, layout, tiny_moe_model_dirs,
                                                       oracle):
    assert_engine_matches(tiny_moe_model_dirs[weights], layout, oracle)


@pytest.mark.parametrize("fields", [
    dict(mlp_only_layers=[0]),
    dict(decoder_sparse_step=2),
    dict(mlp_only_layers=[1, 3], decoder_sparse_step=1),
    dict(num_experts=0),
])
def test_dense_and_sparse_layers_are_where_transformers_puts_them(fields):
    from transformers import Qwen3MoeConfig
    from transformers import Qwen3MoeForCausalLM as HFQwen3Moe
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                            moe_intermediate_size=8, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, num_experts_per_tok=1, **fields)
    with torch.device("meta"):
        theirs = HFQwen3Moe(hf_cfg)
        ours = Qwen3MoeForCausalLM(parse_model_config(hf_cfg.to_dict()))
    assert ([isinstance(layer.mlp, SparseMoE) for layer in ours.layers]
            == [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in theirs.model.layers])


def test_both_weight_layouts_load_the_same_weights(tiny_moe_model_dirs):
    hub, fused = (load_engine_model(tiny_moe_model_dirs[name]) for name in ("hub", "fused"))
    fused_weights = dict(fused.named_parameters())
    for name, weight in hub.named_parameters():
        assert torch.equal(weight, fused_weights[name]), name


def test_a_checkpoint_missing_one_experts_tensor_is_refused(tiny_moe_model_dirs, tmp_path):
    hub = tiny_moe_model_dirs["hub"]
    shutil.copytree(hub, tmp_path / "model")
    path = tmp_path / "model" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError,
                       match=r"weights missing for \['layers.2.mlp.experts.gate_up_proj'\]"):
        load_engine_model(tmp_path / "model")
