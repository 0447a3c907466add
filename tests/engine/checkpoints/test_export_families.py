"""Every family the registry serves can be exported: a family cannot land in
`engine.models.registry.FAMILIES` without a tiny model the suite builds, whose export, with
an adapter on every module the family lets an adapter target, transformers alone runs as
pokeserve serves the checkpoint. The per-family export tests (test_export*.py) pin the
service's adapter formats and the layouts; this one pins that none is left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoints.export import export_checkpoint
from engine.checkpoints.merge import LoraManager
from engine.config import LoraTarget
from engine.models.registry import FAMILIES, load_model_config, lora_targets, model_class
from tests.engine.checkpoints.exports import transformers_logprobs_fn
from tests.engine.checkpoints.helpers import (
    PROMPT,
    TOLERANCE,
    assert_same_model_outputs,
    engine_logprobs_fn,
    load_engine_model,
    write_adapter,
)

RANK, ALPHA = 2, 4


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dirs, tiny_moe_model_dirs, tiny_harmony_model_dir,
                tiny_gpt_oss_mxfp4_dir, hybrid_model_dirs) -> dict[str, list[Path]]:
    """model_type -> every tiny model of that type the suite builds (tests/conftest.py)."""
    dirs = [*tiny_model_dirs.values(), *tiny_moe_model_dirs.values(), tiny_harmony_model_dir,
            tiny_gpt_oss_mxfp4_dir, *hybrid_model_dirs.values()]
    by_type: dict[str, list[Path]] = {}
    for model_dir in dirs:
        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        by_type.setdefault(model_type, []).append(model_dir)
    return by_type


def every_target(cfg) -> dict[str, LoraTarget]:
    """`lora_targets`, less the slices of a fused module that is a target itself (Qwen3.5's
    in_proj_q/k/v of in_proj_qkv: an adapter may name one or the other, not both)."""
    targets, family = lora_targets(cfg), model_class(cfg.model_type)
    return {module: target for module, target in targets.items()
            if family.fused_module(module) not in targets}


def every_target_adapter(model_dir: Path, out: Path) -> Path:
    """Random factors for every target: A [r, in] and B [out, r], or per expert
    [E, r, in] and [E, out, r] (the embedding's A [r, vocab], B [hidden, r])."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for module, target in every_target(load_model_config(model_dir)).items():
        lead = (target.num_experts,) if target.num_experts else ()
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(*lead, RANK, target.in_features,
                                                      generator=g) * 0.1
        tensors[f"{key}.lora_B.weight"] = torch.randn(*lead, target.out_features, RANK,
                                                      generator=g) * 0.1
    return write_adapter(out, tensors, {"r": RANK, "lora_alpha": ALPHA})


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_registered_family_exports_with_every_adapter_target_merged(model_type, tiny_models,
                                                                          tmp_path):
    dirs = tiny_models.get(model_type)
    assert dirs, (f"no tiny model of model_type {model_type!r}: add one to tests/tiny_models.py "
                  "and tests/conftest.py, so that its export is tested")
    for model_dir in dirs:
        root = tmp_path / model_dir.name
        adapter = every_target_adapter(model_dir, root / "every-target")
        out = export_checkpoint("every-target", root / "out", model_dir=model_dir,
                                checkpoint_root=root, progress=False)
        model = load_engine_model(model_dir)
        base = engine_logprobs_fn(model)(PROMPT)
        LoraManager(model).activate(adapter)
        served = engine_logprobs_fn(model)
        assert (served(PROMPT) - base).abs().max() > 100 * TOLERANCE, model_dir.name
        assert_same_model_outputs(served, transformers_logprobs_fn(out))
