"""Every model family serves mixed steps: requests of different checkpoints in one batch get
what each gets served alone (merged, itself checked against transformers by the family's
own tests), and a hybrid model's state slots all come back. Adapters are random factors
on every module a family lets an adapter target except the experts; on Qwen3.5 one
adapter has the training service's split in_proj_q/k/v, the other PEFT's fused
in_proj_qkv, so both layouts share the stacked slots. The fallbacks are pinned too: an
adapter of MoE experts, or one adapting a fused projection whole and in parts, is
served merged and never shares a step."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.models.registry import load_model_config, lora_targets
from tests.engine.checkpoints.helpers import write_adapter
from tests.engine.checkpoints.test_expert_adapter import (
    TYPICAL,
    expert_factors,
    linear_factors,
    service_adapter,
)

PROMPTS = [[5, 17, 42, 99, 7, 23, 61, 30, 8, 77], [20, 3, 54, 9]]
TOLERANCE = 1e-4
# Qwen3.5's in_proj_qkv: adapted whole (PEFT) or as its three slices (the training service).
FUSED, SPLIT = ("in_proj_qkv",), ("in_proj_q", "in_proj_k", "in_proj_v")


def dense_adapter(model_dir: Path, out: Path, r: int, seed: int, embedding: bool,
                  skip: tuple[str, ...] = ()) -> Path:
    """Random factors for every non-expert target of the model (the embedding if asked),
    but those whose name ends in one of `skip`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, target in lora_targets(load_model_config(model_dir)).items():
        if (target.num_experts or (module == "model.embed_tokens" and not embedding)
                or module.endswith(skip)):
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
        stats = eng.stats()
    finally:
        eng.shutdown()
    assert stats.num_unmerged_lora_steps > 0
    assert stats.num_free_state_slots == stats.num_total_state_slots   # hybrids: none leaked
    for got, want in zip(mixed, single):
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                   atol=TOLERANCE, rtol=0)
    return steps


@pytest.fixture
def family_dirs(tiny_model_dirs, tiny_moe_model_dirs, tiny_harmony_model_dir,
                hybrid_model_dirs) -> dict:
    return {**tiny_model_dirs, "qwen3-moe": tiny_moe_model_dirs["hub"],
            "gpt-oss": tiny_harmony_model_dir, **hybrid_model_dirs}


@pytest.mark.parametrize("family", ["llama-gqa-untied", "llama3-rope-scaling", "qwen2-qkv-bias",
                                    "qwen3-qk-norm-tied", "qwen3-moe", "gpt-oss", "qwen3_5-text",
                                    "qwen3_5-vl-tied", "qwen3_5_moe-text", "qwen3_5_moe-vl"])
def test_every_family_serves_mixed_steps_as_it_serves_each_checkpoint_alone(
        family, family_dirs, tmp_path):
    model_dir, root = family_dirs[family], tmp_path / "checkpoints"
    dense_adapter(model_dir, root / "a", r=4, seed=1, embedding=True, skip=FUSED)
    dense_adapter(model_dir, root / "b", r=2, seed=2, embedding=False, skip=SPLIT)
    assert_mixed_equals_alone(model_dir, root, ["a", "b", None])


def expert_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """Qwen3.5-MoE's experts adapted in every layer (3-D factors), and one mixer."""
    cfg, g = load_model_config(model_dir), torch.Generator().manual_seed(seed)
    tensors = linear_factors("model.layers.0.linear_attn.out_proj", cfg.hidden_size,
                             cfg.linear_attention.value_dim, 4, g)
    for layer in range(cfg.num_layers):
        tensors |= expert_factors(cfg, layer, TYPICAL, 4, g)
    return write_adapter(out, tensors, {"r": 4, "lora_alpha": 8})


@pytest.mark.parametrize("family, make_adapter", [
    ("qwen3-moe", lambda model_dir, out, seed: service_adapter(model_dir, out, seed=seed)),
    ("qwen3_5_moe-text", expert_adapter),
], ids=["qwen3-moe-experts", "qwen3_5_moe-experts"])
def test_an_adapter_a_slot_cannot_hold_is_served_merged_and_never_shares_a_step(
        family, make_adapter, family_dirs, tmp_path):
    model_dir, root = family_dirs[family], tmp_path / "checkpoints"
    make_adapter(model_dir, root / "alone", seed=3)
    dense_adapter(model_dir, root / "dense", r=4, seed=4, embedding=False, skip=FUSED)
    steps = assert_mixed_equals_alone(model_dir, root, ["alone", "dense", None])
    alone_steps = [ckpts for ckpts in steps if any(c and c.name == "alone" for c in ckpts)]
    assert alone_steps and all(len(ckpts) == 1 for ckpts in alone_steps)


def test_a_broken_checkpoint_in_a_mixed_step_of_a_hybrid_model_gives_back_its_state_slot(
        family_dirs, tmp_path):
    model_dir, root = family_dirs["qwen3_5-text"], tmp_path / "checkpoints"
    dense_adapter(model_dir, root / "good", r=4, seed=1, embedding=False, skip=FUSED)
    broken = dense_adapter(model_dir, root / "broken", r=2, seed=2, embedding=False, skip=SPLIT)
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    eng = Engine(model_dir, block_size=4, num_kv_blocks=256, checkpoint_root=str(root),
                 progress=False)
    try:
        alone = run(eng, [("good", PROMPTS[0])])
    finally:
        eng.shutdown()
    # Inline: every request is queued before the loop starts, so the first step mixes them.
    eng = Engine(model_dir, block_size=4, num_kv_blocks=256, checkpoint_root=str(root),
                 progress=False, core="inline")
    steps = []
    prepare = eng.core.lora.prepare
    eng.core.lora.prepare = lambda ckpts: steps.append(ckpts) or prepare(ckpts)
    good, bad = (eng.checkpoints.resolve(name) for name in ("good", "broken"))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])           # rewritten badly since resolved
    streams = [eng.add_request(PROMPTS[0], params, checkpoint=good)[0],
               eng.add_request(PROMPTS[1], params, checkpoint=bad)[0],
               eng.add_request(PROMPTS[1], params)[0]]
    outputs = []
    client = threading.Thread(target=lambda: outputs.extend(
        [list(stream) for stream in streams]) or eng.shutdown())
    client.start()
    eng.run()
    client.join()
    assert len(steps[0]) == 3                                 # good, broken and the base
    assert outputs[1][-1].finish_reason == "error" and "corrupt" in outputs[1][-1].error
    assert [t for out in outputs[0] for t in out.token_ids] == alone[0].tokens
    assert eng.core.state_slots.num_free_slots == eng.core.state_slots.num_total_slots > 0
