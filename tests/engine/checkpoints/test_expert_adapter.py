"""LoRA on the experts of a MoE model, in the training service's 3-D format.

The oracle is transformers' Qwen3-MoE with every delta added by hand: expert e of a
layer gets `scale * B[e] @ A[e]` in its slice of transformers' fused tensors (a factor
with a leading 1 serving every expert); attention, the dense layer, the router and the
head get `scale * B @ A` in their weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints.adapter import inspect_adapter, load_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.models.loader import load_model
from engine.models.registry import load_model_config
from tests.engine.checkpoints.helpers import (
    PROMPT,
    TOLERANCE,
    assert_same_model_outputs,
    assert_switching_a_b_a_then_base_is_bit_exact,
    engine_logprobs_fn,
    greedy,
    hand_merged_qwen3_moe,
    load_engine_model,
    write_adapter,
)

PREFIX = "base_model.model.model.layers"
SPARSE_LAYERS = (1, 2)                      # layer 0 of the tiny MoE is dense
TYPICAL = {"w1": "A", "w3": "A", "w2": "B"}   # which factor the service shares, by projection


def expert_factors(cfg, layer: int, shared: dict[str, str], r: int, g: torch.Generator) -> dict:
    """3-D factors of one layer's experts; `shared[w]` names the factor with a leading 1."""
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    dims = {"w1": (i, h), "w3": (i, h), "w2": (h, i)}
    tensors = {}
    for w, (out_dim, in_dim) in dims.items():
        lead_a = 1 if "A" in shared.get(w, "") else e
        lead_b = 1 if "B" in shared.get(w, "") else e
        key = f"{PREFIX}.{layer}.mlp.experts.{w}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(lead_a, r, in_dim, generator=g) * 0.1
        tensors[f"{key}.lora_B.weight"] = torch.randn(lead_b, out_dim, r, generator=g) * 0.1
    return tensors


def linear_factors(module: str, out_dim: int, in_dim: int, r: int, g: torch.Generator) -> dict:
    return {f"base_model.model.{module}.lora_A.weight": torch.randn(r, in_dim, generator=g) * 0.1,
            f"base_model.model.{module}.lora_B.weight": torch.randn(out_dim, r, generator=g) * 0.1}


def service_adapter(model_dir: Path, out: Path, *, shared: dict[str, str] = TYPICAL, r: int = 4,
                    alpha: float = 8, seed: int = 0, attention: bool = True, head: bool = True,
                    router: bool = False, layers: tuple[int, ...] = SPARSE_LAYERS) -> Path:
    """An adapter as the training service saves one for a MoE model (only `r`, `lora_alpha`
    in its config: the targets are whatever the tensors name)."""
    cfg, g = load_model_config(model_dir), torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        tensors |= expert_factors(cfg, layer, shared, r, g)
        if router:
            tensors |= linear_factors(f"model.layers.{layer}.mlp.gate", cfg.num_experts,
                                      cfg.hidden_size, r, g)
    if attention:
        for layer in range(cfg.num_layers):
            tensors |= linear_factors(f"model.layers.{layer}.self_attn.q_proj", cfg.q_size,
                                      cfg.hidden_size, r, g)
        tensors |= linear_factors("model.layers.0.mlp.down_proj", cfg.hidden_size,
                                  cfg.intermediate_size, r, g)   # the dense layer's MLP
    if head:
        tensors |= linear_factors("model.unembed_tokens", cfg.vocab_size, cfg.hidden_size, r, g)
    return write_adapter(out, tensors, {"r": r, "lora_alpha": alpha})


@pytest.fixture(scope="module")
def model_dir(tiny_moe_model_dirs) -> Path:
    return tiny_moe_model_dirs["hub"]


CASES = {
    "typical-sharing-with-attention-and-head": dict(),
    "every-factor-per-expert": dict(shared={}),
    "the-other-factors-shared": dict(shared={"w1": "B", "w3": "B", "w2": "A"}),
    "both-factors-shared": dict(shared={"w1": "AB", "w3": "A", "w2": "B"}, attention=False),
    "router-too": dict(router=True, head=False),
    "experts-alone": dict(attention=False, head=False, r=8, alpha=32),
}


@pytest.mark.parametrize("case", CASES)
def test_merged_expert_adapter_matches_a_hand_merge(case, model_dir, tmp_path):
    adapter = service_adapter(model_dir, tmp_path / "adapter", **CASES[case])
    model = load_engine_model(model_dir)
    LoraManager(model).activate(adapter)
    assert_same_model_outputs(engine_logprobs_fn(model),
                              hand_merged_qwen3_moe(model_dir, adapter))


def test_expert_adapter_really_changes_the_outputs(model_dir, tmp_path):
    # Guards the parity tests: the experts' deltas alone move the outputs well past the tolerance.
    adapter = service_adapter(model_dir, tmp_path / "a", attention=False, head=False)
    model = load_engine_model(model_dir)
    base = engine_logprobs_fn(model)(PROMPT)
    LoraManager(model).activate(adapter)
    assert (engine_logprobs_fn(model)(PROMPT) - base).abs().max() > 100 * TOLERANCE


def test_switching_a_b_a_then_base_is_bit_exact(model_dir, tmp_path):
    a = service_adapter(model_dir, tmp_path / "a", seed=1)
    b = service_adapter(model_dir, tmp_path / "b", seed=2, shared={}, router=True, head=False)
    assert_switching_a_b_a_then_base_is_bit_exact(load_engine_model(model_dir), a, b, PROMPT)


def test_only_the_tensors_an_adapter_touches_get_base_copies(model_dir, tmp_path):
    both = service_adapter(model_dir, tmp_path / "both", attention=False, head=False, layers=(1,))
    gate_only = write_adapter(tmp_path / "gate", {k: v for k, v in load_file(
        both / "adapter_model.safetensors").items() if ".w1." in k}, {"r": 4, "lora_alpha": 8})
    model = load_engine_model(model_dir)
    experts = model.layers[1].mlp.experts
    base_gate_up = experts.gate_up_proj.detach().clone()
    base_down = experts.down_proj.detach().clone()
    manager, width = LoraManager(model), experts.intermediate_size
    manager.activate(both)
    # gate/up and down of layer 1's experts: nothing else is copied
    assert manager.base_copy_bytes == experts.gate_up_proj.nbytes + experts.down_proj.nbytes
    manager.activate(gate_only)
    assert torch.equal(experts.gate_up_proj[:, width:], base_gate_up[:, width:])   # up: base again
    assert not torch.equal(experts.gate_up_proj[:, :width], base_gate_up[:, :width])
    assert torch.equal(experts.down_proj, base_down)                                 # restored


def test_bfloat16_experts_get_the_float32_merge_cast_once(model_dir, tmp_path):
    cfg = load_model_config(model_dir)
    model = load_model(model_dir, cfg, "cpu", torch.bfloat16, progress=False)
    adapter_dir = service_adapter(model_dir, tmp_path / "a", attention=False, head=False)
    base = model.layers[2].mlp.experts.down_proj.detach().clone()
    LoraManager(model).activate(adapter_dir)
    w2 = next(m for m in load_adapter(adapter_dir, cfg).modules
              if m.module == "model.layers.2.mlp.experts.down_proj")
    for e in range(cfg.num_experts):   # w2: B shared, A per expert
        expected = (base[e].float() + w2.scale * (w2.lora_b[0] @ w2.lora_a[e])).to(torch.bfloat16)
        assert torch.equal(model.layers[2].mlp.experts.down_proj[e], expected), e


def test_expert_adapter_served_through_the_engine(model_dir, tmp_path):
    from engine import Engine, ModelInput, SamplingParams

    root = tmp_path / "checkpoints"
    adapter = service_adapter(model_dir, root / "run:train:0" / "sampler_weights" / "000010")
    engine = Engine(model_dir, block_size=4, num_kv_blocks=64, checkpoint_root=str(root),
                    progress=False)
    try:
        client = engine.sampling_client("tinker://run:train:0/sampler_weights/000010")
        params = SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        tokens = client.sample(ModelInput.from_ints(PROMPT), 1, params).result(timeout=60)
    finally:
        engine.shutdown()
    assert tokens.sequences[0].tokens == greedy(hand_merged_qwen3_moe(model_dir, adapter),
                                                PROMPT, 8)


# ---- what the reader refuses -------------------------------------------------------------

def experts_key(layer: int, w: str, ab: str) -> str:
    return f"{PREFIX}.{layer}.mlp.experts.{w}.lora_{ab}.weight"


@pytest.mark.parametrize("tensors, message", [
    (lambda c: {experts_key(1, "w1", "A"): torch.randn(3, 4, c.hidden_size),
                experts_key(1, "w1", "B"): torch.randn(1, c.moe_intermediate_size, 4)},
     r"experts.w1: lora_A \[3, 4, 64\] / lora_B \[1, 32, 4\] do not fit this base model "
     r"\(expected \[8 or 1, r, 64\] / \[8 or 1, 32, r\]\)"),
    (lambda c: {experts_key(1, "w2", "A"): torch.randn(4, c.moe_intermediate_size),
                experts_key(1, "w2", "B"): torch.randn(c.hidden_size, 4)},
     r"experts.w2: lora_A \[4, 32\] / lora_B \[64, 4\] do not fit"),
    (lambda c: {experts_key(1, "w3", "A"): torch.randn(1, 4, c.moe_intermediate_size),
                experts_key(1, "w3", "B"): torch.randn(8, c.moe_intermediate_size, 4)},
     r"experts.w3: lora_A \[1, 4, 32\] / lora_B \[8, 32, 4\] do not fit"),   # in/out swapped
    (lambda c: {experts_key(0, "w1", "A"): torch.randn(1, 4, c.hidden_size),
                experts_key(0, "w1", "B"): torch.randn(8, c.moe_intermediate_size, 4)},
     "MoE expert factors, but layer 0 of this qwen3_moe model is dense"),
    (lambda c: linear_factors("model.layers.1.mlp.experts.3.gate_proj", c.moe_intermediate_size,
                              c.hidden_size, 4, torch.Generator()),
     r"unknown expert module \(experts are adapted through the 3-D factors"),
    (lambda c: linear_factors("model.layers.1.mlp.gate_proj", c.moe_intermediate_size,
                              c.hidden_size, 4, torch.Generator()),
     "unknown target module for a qwen3_moe model"),            # a sparse layer has no dense MLP
])
def test_unservable_expert_adapters_are_refused_naming_the_problem(tensors, message, model_dir,
                                                                   tmp_path):
    cfg = load_model_config(model_dir)
    adapter_dir = write_adapter(tmp_path, tensors(cfg), {"r": 4, "lora_alpha": 8})
    with pytest.raises(CheckpointInvalid, match=message):
        inspect_adapter(adapter_dir, cfg)
    with pytest.raises(CheckpointInvalid, match=message):
        load_adapter(adapter_dir, cfg)
