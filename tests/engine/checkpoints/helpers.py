"""LoRA test helpers: PEFT adapters as the oracle, and one-sequence forwards to compare.

PEFT makes and saves the adapters (random non-zero factors) and, reloading them from
disk over a transformers model, gives the reference logprobs; our side loads the same
directory into the engine's model through LoraManager.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoints.merge import LoraManager
from engine.layers.attention import AttentionMetadata
from engine.layers.linear_attention import StateSlotMetadata
from engine.model_runner import allocate_kv_caches
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import load_model
from engine.models.registry import load_model_config

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [5, 17, 42, 99, 7, 23, 61, 130, 8, 77, 3, 54]
TOLERANCE = 1e-4
LogprobsFn = Callable[[list[int]], torch.Tensor]   # token ids -> logprobs [len, vocab]


def save_peft_adapter(model_dir: Path, out_dir: Path, *, r: int = 8, lora_alpha: float = 16,
                      targets: list[str] = ALL_LINEAR, seed: int = 0, std: float = 0.05,
                      **lora_options) -> Path:
    """A PEFT LoRA over the model in `model_dir` with random non-zero A and B, saved as a
    complete checkpoint (`lora_options`: use_rslora, rank_pattern, alpha_pattern...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights=False,
                        **lora_options)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    (out_dir / "checkpoint_complete").touch()
    return out_dir


def save_nan_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A complete PEFT adapter one of whose factors holds a NaN: its headers pass the
    checks made when it is named, and only loading its tensors finds it broken."""
    save_peft_adapter(model_dir, out_dir, r=2)
    weights = out_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, weights)
    return out_dir


def peft_logprobs_fn(model_dir: Path, adapter_dir: Path | None) -> LogprobsFn:
    """transformers + PEFT (unmerged, as PEFT reads the adapter from disk)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs


# Adds one expert module's delta by hand: (the experts' module, "w1" | "w2" | "w3", A, B, scale).
ExpertMerge = Callable[[torch.nn.Module, str, torch.Tensor, torch.Tensor, float], None]


def hand_merged_transformers(model_dir: Path, adapter_dir: Path,
                             merge_experts: ExpertMerge) -> LogprobsFn:
    """transformers with an adapter in the training service's format merged by hand:
    `merge_experts` adds the experts' 3-D factors in the family's own layout; every other
    module gets `scale * B @ A` in its weight (the head named `model.unembed_tokens`, a
    layer's attention `attn` as in gpt-oss adapters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith("lora_A.weight")]:
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if ".experts.w" in module:
                experts, w = module.rsplit(".", 1)
                merge_experts(model.get_submodule(experts), w, a, b, scale)
            else:
                target = "lm_head" if module == "model.unembed_tokens" else module
                model.get_submodule(target.replace(".attn.", ".self_attn.")).weight += scale * b @ a

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs


def expert_delta(a: torch.Tensor, b: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert e's `B[e] @ A[e]` ([out, in]) from 3-D factors, a leading 1 serving every expert."""
    return b[expert if len(b) > 1 else 0] @ a[expert if len(a) > 1 else 0]


def add_qwen3_moe_expert_delta(experts, w: str, a, b, scale: float) -> None:
    """transformers' Qwen3-MoE experts: gate_up_proj [E, 2I, H] (gate rows, then up rows)."""
    width = experts.gate_up_proj.shape[1] // 2
    fused, rows = {"w1": (experts.gate_up_proj, slice(0, width)),
                   "w3": (experts.gate_up_proj, slice(width, 2 * width)),
                   "w2": (experts.down_proj, slice(None))}[w]
    for e in range(fused.shape[0]):
        fused[e, rows] += scale * expert_delta(a, b, e)


def hand_merged_qwen3_moe(model_dir: Path, adapter_dir: Path) -> LogprobsFn:
    return hand_merged_transformers(model_dir, adapter_dir, add_qwen3_moe_expert_delta)


def load_engine_model(model_dir: Path) -> LlamaForCausalLM:
    return load_model(model_dir, load_model_config(model_dir), "cpu", torch.float32, progress=False)


def engine_logprobs_fn(model: LlamaForCausalLM, block_size: int = 16) -> LogprobsFn:
    """Our model on one sequence prefilled at once into fresh zero KV caches (and, for a
    hybrid model, a fresh state slot)."""
    cfg = model.cfg
    dtype = model.embed_tokens.weight.dtype
    has_state = cfg.linear_attention is not None

    @torch.inference_mode()
    def logprobs(ids: list[int]) -> torch.Tensor:
        n = len(ids)
        num_blocks = -(-n // block_size)
        caches = allocate_kv_caches(cfg, num_blocks, block_size, dtype, "cpu",
                                    num_state_rows=1)
        state_slots = StateSlotMetadata.build([0], [True], 0, "cpu") if has_state else None
        meta = AttentionMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(num_blocks)[None],
                                 context_lens=[n], query_lens=[n], num_decodes=0,
                                 block_size=block_size, state_slots=state_slots)
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)
    return logprobs


def greedy(logprobs: LogprobsFn, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (tiny inputs only)."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(logprobs(ids)[-1].argmax()))
    return ids[len(prompt):]


def assert_same_model_outputs(ours, oracle, num_new_tokens: int = 6) -> None:
    """Greedy tokens equal; the logprob of every token of prompt + continuation, and the
    top-5 logprobs at every position (what a client sees), within TOLERANCE."""
    tokens = greedy(oracle, PROMPT, num_new_tokens)
    assert greedy(ours, PROMPT, num_new_tokens) == tokens
    ids = PROMPT + tokens
    ours_lp, oracle_lp = ours(ids), oracle(ids)
    targets = torch.tensor(ids[1:])[:, None]
    token_diff = (ours_lp[:-1].gather(1, targets) - oracle_lp[:-1].gather(1, targets)).abs().max().item()
    top_diff = (ours_lp.topk(5).values - oracle_lp.topk(5).values).abs().max().item()
    assert max(token_diff, top_diff) < TOLERANCE, f"token {token_diff:.2e}, top-5 {top_diff:.2e}"


def weights(model) -> dict[str, torch.Tensor]:
    """Every weight the model computes with, the head included even when tied."""
    return {**{k: v.clone() for k, v in model.named_parameters()},
            "lm_head": model.lm_head.weight.clone()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_switching_a_b_a_then_base_is_bit_exact(model, a: Path, b: Path,
                                                  prompt: list[int]) -> None:
    """Adapter A, then B, then A again: the weights and outputs of A bit for bit; then the
    base model's, bit for bit."""
    manager, forward = LoraManager(model), engine_logprobs_fn(model)
    base_weights, base_out = weights(model), forward(prompt)
    manager.activate(a)
    a_weights, a_out = weights(model), forward(prompt)
    manager.activate(b)
    assert not torch.equal(forward(prompt), a_out)
    manager.activate(a)
    assert_bit_identical(weights(model), a_weights)
    assert torch.equal(forward(prompt), a_out)
    manager.activate(None)
    assert_bit_identical(weights(model), base_weights)
    assert torch.equal(forward(prompt), base_out)


def assert_merged_alike(model, a: Path, b: Path) -> None:
    """Adapters `a` and `b` (two layouts of the same factors) merge into bit-identical weights."""
    manager = LoraManager(model)
    manager.activate(a)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    manager.activate(b)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, merged[name]), name


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict,
                  complete: bool = True) -> Path:
    """An adapter written by hand (for layouts and damage PEFT would not produce)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    if complete:
        (out_dir / "checkpoint_complete").touch()
    return out_dir


def to_training_service_layout(peft_dir: Path, out_dir: Path) -> Path:
    """The same adapter as the training service names it: the head is `model.unembed_tokens`,
    the input embedding's factors are plain `lora_A.weight` / `lora_B.weight`."""
    renamed = {}
    for key, tensor in load_file(peft_dir / "adapter_model.safetensors").items():
        key = key.replace("base_model.model.lm_head.", "base_model.model.model.unembed_tokens.")
        for ab in "AB":
            key = key.replace(f".lora_embedding_{ab}", f".lora_{ab}.weight")
        renamed[key] = tensor
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config["target_modules"] = ["unembed_tokens" if t == "lm_head" else t for t in config["target_modules"]]
    return write_adapter(out_dir, renamed, config)


def pack_archive(checkpoint_dir: Path, archive: Path,
                 extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    """A checkpoint as the service's archive URL hands it out: one uncompressed tar with
    the checkpoint's files at its top level, then any `extra` (member, data) pairs."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        for file in sorted(checkpoint_dir.iterdir()):
            tar.add(file, arcname=file.name)
        for member, data in extra:
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return archive
