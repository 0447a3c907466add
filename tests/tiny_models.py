"""Tiny random models of each supported family, saved as Hugging Face directories.

Each directory also gets a small byte-level BPE tokenizer trained on the spot, so the
engine can load it like a real model without anything from a hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 384   # the tokenizer's target; the models take its actual size
EOS_ID = 0
_CORPUS = ["the quick brown fox jumps over the lazy dog", "pokeserve serves checkpoints",
           "paged attention reads blocks of keys and values", "hello world 0123456789"] * 20


def _common(**extra) -> dict:
    return dict(dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     eos_token_id=EOS_ID, bos_token_id=1, pad_token_id=EOS_ID), **extra)


def family_configs() -> dict:
    """name -> transformers config, one per behaviour the engine must match."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "llama-gqa-untied": LlamaConfig(**_common(tie_word_embeddings=False)),
        "llama3-rope-scaling": LlamaConfig(**_common(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})),
        "qwen2-qkv-bias": Qwen2Config(**_common(tie_word_embeddings=False)),
        "qwen3-qk-norm-tied": Qwen3Config(**_common(head_dim=32, tie_word_embeddings=True)),
    }


def moe_config():
    """A tiny Qwen3-MoE: 8 experts, top 2, layer 0 dense (`mlp_only_layers`), 1 and 2 sparse."""
    from transformers import Qwen3MoeConfig

    fields = _common(head_dim=32, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0])
    return Qwen3MoeConfig(**{**fields, "num_hidden_layers": 3})


def hybrid_configs() -> dict:
    """name -> transformers config of a Qwen3.5 model: three linear-attention layers, then
    one gated-attention layer, with the hub's multimodal rotary sections; dense and MoE
    (4 experts, top 2, and a shared expert), text and vision-language layouts."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5MoeConfig,
        Qwen3_5MoeTextConfig,
        Qwen3_5TextConfig,
    )

    text = _common(head_dim=32, num_hidden_layers=4, linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                    "mrope_interleaved": True})
    moe = {**{k: v for k, v in text.items() if k != "intermediate_size"}, "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 48}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=4, num_position_embeddings=16)
    return {
        "qwen3_5-text": Qwen3_5TextConfig(**text, tie_word_embeddings=False),
        # The vision-language model ties by its own flag; the hub sets the text one alike.
        "qwen3_5-vl-tied": Qwen3_5Config(text_config=dict(text, tie_word_embeddings=True),
                                         vision_config=vision, tie_word_embeddings=True),
        "qwen3_5_moe-text": Qwen3_5MoeTextConfig(**moe, tie_word_embeddings=False),
        "qwen3_5_moe-vl": Qwen3_5MoeConfig(text_config=moe, vision_config=vision),
    }


def save_tiny_model(config, path: Path, seed: int = 0) -> Path:
    """A random model saved with `save_pretrained` in the layout its config names (a
    vision-language config saves the whole model, tower included; MoE experts one tensor
    per expert, as on the hub)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vocab_size = save_tiny_tokenizer(path)  # every model id is a tokenizer id
    config.get_text_config().vocab_size = vocab_size
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # make the random model less flat, so greedy choices are clear-cut
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def save_state_dict_copy(model_dir: Path, path: Path) -> Path:
    """The same model as transformers holds it in memory (`state_dict()`: MoE experts fused
    into `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]), written by hand."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shutil.copytree(model_dir, path, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors")
    return path


def save_tiny_tokenizer(path: Path) -> int:
    """Train and save the tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>",
                            pad_token="<eos>").save_pretrained(path)
    return tok.get_vocab_size()
