"""Every model family serves mixed steps: requests of different checkpoints in one batch get
what each gets served alone (merged, itself checked against transformers by the family's
own tests). Adapters are random factors on every module a family lets an adapter target
except the experts; an adapter of MoE experts is served merged and never shares a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.models.registry import load_model_config, lora_targets
from tests.engine.checkpoints.helpers import write_adapter
from tests.engine.checkpoints.test_expert_adapter import service_adapter

PROMPTS = [[5, 17, 42, 99, 7, 23, 61, 30, 8, 77], [20, 3, 54, 9]]
TOLERANCE = 1e-4


def dense_adapter(model_dir: Path, out: Path, r: int, seed: int, embedding: bool) -> Path:
    """Random factors for every non-expert target of the model (the embedding if asked)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, target in lora_targets(load_model_config(model_dir)).items():
        if target.num_experts or (module == "model.embed_tokens" and not embedding):
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, target.in_features, generator=g) * 0.1
        tensors[f"{key}.lora_B.weight"] = torch.randn(target.out_features, r, generator=g) * 0.1
    return write_adapter(out, tensors, {"r": r, "lora_alpha": 2 * r})


def run(engine: Engine, jobs: list[tuple[str | None, list[int]]]) -> list:
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    futures = [engine.sampling_client(c).sample(ModelInput.from_ints(p), 1, params)
               for c, p in jobs]
    return [f.result(timeout=120).sequences[0] for f in futures]


def assert_mixed_equals_alone(model_dir: Path, root: Path, names: list[str | None]) -> list:
    """Serve every (checkpoint, prompt) alone, then all at once; returns the steps' checkpoints."""
    eng = Engine(model_dir, block_size=4, num_kv_blocks=256, checkpoint_root=str(root),
                 progress=False)
    steps = []
    prepare = eng.core.lora.prepare
    eng.core.lora.prepare = lambda ckpts: steps.append(ckpts) or prepare(ckpts)
    jobs = [(c, p) for p in PROMPTS for c in names]
    try:
        single = [run(eng, [job])[0] for job in jobs]
        mixed = run(eng, jobs)
        assert eng.stats().num_unmerged_lora_steps > 0
    finally:
        eng.shutdown()
    for got, want in zip(mixed, single):
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                   atol=TOLERANCE, rtol=0)
    return steps


def family_dirs(tiny_model_dirs, tiny_moe_model_dirs, tiny_harmony_model_dir) -> dict:
    return {**tiny_model_dirs, "qwen3-moe": tiny_moe_model_dirs["hub"],
            "gpt-oss": tiny_harmony_model_dir}


@pytest.mark.parametrize("family", ["llama-gqa-untied", "llama3-rope-scaling", "qwen2-qkv-bias",
                                    "qwen3-qk-norm-tied", "qwen3-moe", "gpt-oss"])
def test_every_family_serves_mixed_steps_as_it_serves_each_checkpoint_alone(
        family, tiny_model_dirs, tiny_moe_model_dirs, tiny_harmony_model_dir, tmp_path):
    model_dir = family_dirs(tiny_model_dirs, tiny_moe_model_dirs, tiny_harmony_model_dir)[family]
    dense_adapter(model_dir, tmp_path / "checkpoints" / "a", r=4, seed=1, embedding=True)
    dense_adapter(model_dir, tmp_path / "checkpoints" / "b", r=2, seed=2, embedding=False)
    assert_mixed_equals_alone(model_dir, tmp_path / "checkpoints", ["a", "b", None])


def test_an_expert_adapter_is_served_merged_and_never_shares_a_step(tiny_moe_model_dirs,
                                                                    tmp_path):
    model_dir, root = tiny_moe_model_dirs["hub"], tmp_path / "checkpoints"
    service_adapter(model_dir, root / "experts", seed=3)
    dense_adapter(model_dir, root / "dense", r=4, seed=4, embedding=False)
    steps = assert_mixed_equals_alone(model_dir, root, ["experts", "dense", None])
    expert_steps = [ckpts for ckpts in steps if any(c and c.name == "experts" for c in ckpts)]
    assert expert_steps and all(len(ckpts) == 1 for ckpts in expert_steps)
