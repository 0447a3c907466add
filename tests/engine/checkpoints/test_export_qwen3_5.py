"""`pokeserve export` of Qwen3.5 (dense, MoE; text and vision-language layouts) with an
adapter in the training service's format: the split in_proj_q / in_proj_k / in_proj_v
factors merge into the fused `in_proj_qkv` the hub has, MoE experts are written one
tensor per expert, a vision tower is copied through. Oracle: transformers alone over the
export against pokeserve serving the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoints.export import export_checkpoint
from engine.models.registry import load_model_config
from tests.engine.checkpoints.exports import assert_export_serves_like_the_checkpoint, hub_tensors
from tests.engine.checkpoints.helpers import write_adapter
from tests.engine.checkpoints.test_expert_adapter import linear_factors
from tests.engine.checkpoints.test_qwen3_5_lora import (
    ALPHA,
    RANK,
    moe_service_factors,
    split_qkv_factors,
)

NAME = "tinker://run:train:0/sampler_weights/000010"


def service_factors(model_dir, vision_language: bool) -> dict:
    """Split q/k/v factors on every linear-attention layer (named inside the language model
    for a vision-language base) and the head; the gated attention's q_proj and a dense
    MLP, or for MoE every layer's experts, router and shared expert."""
    cfg = load_model_config(model_dir)
    tensors = split_qkv_factors(model_dir, "model.language_model." if vision_language else "model.")
    if hasattr(cfg, "num_experts"):
        return moe_service_factors(model_dir) | tensors
    g = torch.Generator().manual_seed(5)
    h = cfg.hidden_size
    return (tensors | linear_factors("model.layers.3.self_attn.q_proj", 2 * cfg.q_size, h, RANK, g)
            | linear_factors("model.layers.1.mlp.down_proj", h, cfg.intermediate_size, RANK, g))


@pytest.mark.parametrize("family", ["qwen3_5-text", "qwen3_5-vl-tied", "qwen3_5_moe-text",
                                    "qwen3_5_moe-vl"])
def test_a_qwen3_5_export_with_a_service_adapter_run_by_transformers_alone_matches_serving(
        hybrid_model_dirs, tmp_path, family):
    base, root = hybrid_model_dirs[family], tmp_path / "root"
    served = root / "run:train:0" / "sampler_weights" / "000010"
    write_adapter(served, service_factors(base, "-vl" in family), {"r": RANK, "lora_alpha": ALPHA})
    out = export_checkpoint(NAME, tmp_path / "out", model_dir=base, checkpoint_root=root,
                            progress=False)
    assert_export_serves_like_the_checkpoint(out, base, root, NAME)
    original, written = hub_tensors(base), hub_tensors(out)
    assert written.keys() == original.keys() | {"lm_head.weight"}   # the head, tied or not
    tower = [name for name in original if name.startswith("model.visual.")]
    assert bool(tower) == ("-vl" in family)
    for name in tower:
        assert torch.equal(written[name], original[name]), name       # the tower as it was
    config = json.loads((out / "config.json").read_text())
    assert config["pokeserve_export"]["untied_lm_head"] == load_model_config(base).tie_word_embeddings
