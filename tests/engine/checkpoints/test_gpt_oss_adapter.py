"""LoRA on gpt-oss in the training service's format: attention named `attn`, the experts'
3-D `w1`/`w2`/`w3` factors, the router.

The oracle is transformers' gpt-oss with every delta added by hand in its own layout:
experts are input-major there (`gate_up_proj[e]` [H, 2I], gate in the even columns and
up in the odd ones; `down_proj[e]` [I, H]), so expert e's delta `B[e] @ A[e]` ([out, in])
is added transposed, w1's to the even columns and w3's to the odd ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints.adapter import inspect_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import LoraManager
from engine.models.registry import load_model_config
from tests.engine.checkpoints.helpers import (
    PROMPT,
    TOLERANCE,
    LogprobsFn,
    assert_same_model_outputs,
    assert_switching_a_b_a_then_base_is_bit_exact,
    engine_logprobs_fn,
    expert_delta,
    hand_merged_transformers,
    load_engine_model,
    write_adapter,
)

PREFIX = "base_model.model.model.layers"


def _factors(key: str, lead: tuple[int, int] | None, out_dim: int, in_dim: int, r: int,
             g: torch.Generator) -> dict[str, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r], or 3-D with leading dims `lead` (for A, for B)."""
    lead_a, lead_b = ((), ()) if lead is None else ((lead[0],), (lead[1],))
    return {f"{key}.lora_A.weight": torch.randn(*lead_a, r, in_dim, generator=g) * 0.1,
            f"{key}.lora_B.weight": torch.randn(*lead_b, out_dim, r, generator=g) * 0.1}


def service_adapter(model_dir: Path, out: Path, *, seed: int = 0, r: int = 4, alpha: float = 8,
                    shared: bool = True, router: bool = True) -> Path:
    """Every layer's q/v/o (as `attn`), experts (A shared by w1/w3 and B by w2 when
    `shared`, else per expert) and router; the head as `model.unembed_tokens`."""
    cfg, g = load_model_config(model_dir), torch.Generator().manual_seed(seed)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    leads = ({"w1": (1, e), "w3": (1, e), "w2": (e, 1)} if shared
             else dict.fromkeys(("w1", "w2", "w3"), (e, e)))
    tensors = {}
    for layer in range(cfg.num_layers):
        attn = f"{PREFIX}.{layer}.attn"
        tensors |= _factors(f"{attn}.q_proj", None, cfg.q_size, h, r, g)
        tensors |= _factors(f"{attn}.v_proj", None, cfg.kv_size, h, r, g)
        tensors |= _factors(f"{attn}.o_proj", None, h, cfg.q_size, r, g)
        for w, (out_dim, in_dim) in {"w1": (i, h), "w3": (i, h), "w2": (h, i)}.items():
            key = f"{PREFIX}.{layer}.mlp.experts.{w}"
            tensors |= _factors(key, leads[w], out_dim, in_dim, r, g)
        if router:
            tensors |= _factors(f"{PREFIX}.{layer}.mlp.router", None, e, h, r, g)
    tensors |= _factors("base_model.model.model.unembed_tokens", None, cfg.vocab_size, h, r, g)
    return write_adapter(out, tensors, {"r": r, "lora_alpha": alpha})


def add_gpt_oss_expert_delta(experts, w: str, a, b, scale: float) -> None:
    """transformers' gpt-oss experts, input-major: the delta [out, in] goes in transposed."""
    fused, columns = {"w1": (experts.gate_up_proj, slice(0, None, 2)),
                      "w3": (experts.gate_up_proj, slice(1, None, 2)),
                      "w2": (experts.down_proj, slice(None))}[w]
    for e in range(fused.shape[0]):
        fused[e][:, columns] += scale * expert_delta(a, b, e).T               # [in, out]


def hand_merged(model_dir: Path, adapter_dir: Path) -> LogprobsFn:
    return hand_merged_transformers(model_dir, adapter_dir, add_gpt_oss_expert_delta)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-factors", "per-expert-factors"])
def test_merged_gpt_oss_adapter_matches_a_hand_merge(shared, tiny_harmony_model_dir, tmp_path):
    adapter = service_adapter(tiny_harmony_model_dir, tmp_path / "adapter", shared=shared)
    model = load_engine_model(tiny_harmony_model_dir)
    base = engine_logprobs_fn(model)(PROMPT)
    LoraManager(model).activate(adapter)
    ours = engine_logprobs_fn(model)
    assert (ours(PROMPT) - base).abs().max() > 100 * TOLERANCE    # the adapter matters
    assert_same_model_outputs(ours, hand_merged(tiny_harmony_model_dir, adapter))


def test_attn_names_the_attention_of_a_layer(tiny_harmony_model_dir, tmp_path):
    adapter = service_adapter(tiny_harmony_model_dir, tmp_path / "adapter")
    cfg = load_model_config(tiny_harmony_model_dir)
    inspect_adapter(adapter, cfg)   # accepted: `attn` is `self_attn`
    tensors = load_file(adapter / "adapter_model.safetensors")
    outside = write_adapter(tmp_path / "outside", {
        k.replace(f"{PREFIX}.0.attn.q_proj", "base_model.model.attn.q_proj"): v
        for k, v in tensors.items()}, {"r": 4, "lora_alpha": 8})
    with pytest.raises(CheckpointInvalid, match="attn.q_proj: unknown target module"):
        inspect_adapter(outside, cfg)   # only inside a layer


def test_switching_a_b_a_then_base_is_bit_exact(tiny_harmony_model_dir, tmp_path):
    a = service_adapter(tiny_harmony_model_dir, tmp_path / "a", seed=1)
    b = service_adapter(tiny_harmony_model_dir, tmp_path / "b", seed=2, shared=False,
                        router=False)
    assert_switching_a_b_a_then_base_is_bit_exact(load_engine_model(tiny_harmony_model_dir), a, b,
                                                  PROMPT)
