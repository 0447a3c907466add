"""`pokeserve export` of gpt-oss: the experts back in the hub's input-major layout
(`gate_up_proj` [E, H, 2I], gate and up interleaved; `down_proj` [E, I, H]), MXFP4 experts
written dequantized. Oracles: transformers alone over the export against pokeserve serving
the checkpoint; the base's own tensors, and transformers' own dequantization of them."""

from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoints.export import export_checkpoint
from engine.models.mxfp4 import dequantized_names
from tests.engine.checkpoints.exports import assert_export_serves_like_the_checkpoint, hub_tensors
from tests.engine.checkpoints.test_gpt_oss_adapter import service_adapter

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")   # the tensors MXFP4 quantizes


@pytest.fixture(scope="module")
def bases(tiny_harmony_model_dir, tiny_gpt_oss_mxfp4_dir):
    return {"dense": tiny_harmony_model_dir, "mxfp4": tiny_gpt_oss_mxfp4_dir}


@pytest.mark.parametrize("weights, shared", [("dense", True), ("mxfp4", False)],
                         ids=["dense-shared-factors", "mxfp4-per-expert-factors"])
def test_an_export_with_an_expert_and_attention_adapter_run_by_transformers_alone_matches_serving(
        bases, tmp_path, weights, shared):
    # The adapter: q/v/o as `attn`, every expert's w1/w2/w3, the router and the head.
    base, root = bases[weights], tmp_path / "root"
    service_adapter(base, root / "adapted", shared=shared)
    out = export_checkpoint("adapted", tmp_path / "out", model_dir=base, checkpoint_root=root,
                            progress=False)
    assert_export_serves_like_the_checkpoint(out, base, root, "adapted")


def test_a_dense_base_is_exported_bit_for_bit_in_the_hubs_layout(bases, tmp_path):
    out = export_checkpoint(None, tmp_path / "out", model_dir=bases["dense"], progress=False)
    original, written = hub_tensors(bases["dense"]), hub_tensors(out)
    assert written.keys() == original.keys()
    for name in original:   # a square gate_up_proj here: the values, not the shapes, tell
        assert torch.equal(written[name], original[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_mxfp4_base_is_exported_dequantized_as_transformers_dequantizes_it(bases, tmp_path,
                                                                            dtype):
    from transformers import AutoModelForCausalLM

    base = bases["mxfp4"]
    out = export_checkpoint(None, tmp_path / "out", model_dir=base, dtype=dtype, progress=False)
    original, written = hub_tensors(base), hub_tensors(out)
    assert written.keys() == set(dequantized_names(list(original)))   # a pair: one tensor
    assert not any(name.endswith(("_blocks", "_scales")) for name in written)
    theirs = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).state_dict()
    for name, tensor in written.items():
        assert tensor.dtype == dtype, name
        want = theirs[name] if name.endswith(EXPERTS) else original[name].to(dtype)
        assert torch.equal(tensor, want), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["pokeserve_export"] == {"checkpoint": None, "untied_lm_head": False,
                                          "dequantized": "mxfp4"}
