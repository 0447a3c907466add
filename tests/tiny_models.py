"""Tiny random models of each supported family, saved as Hugging Face directories.

Each directory also gets a small byte-level BPE tokenizer trained on the spot, so the
engine can load it like a real model without anything from a hub. gpt-oss gets one with
the harmony format's special tokens and a chat template that writes that format (the
real o200k-harmony tokenizer cannot be fetched here).
"""

from __future__ import annotations

import json
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
        "llama-attention-bias": LlamaConfig(**_common(attention_bias=True,
                                                      tie_word_embeddings=False)),
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
    """Saved with `save_pretrained` in the layout its config names (a vision-language
    config saves the whole model, tower included; MoE experts one tensor per expert, as
    on the hub)."""
    config.get_text_config().vocab_size = save_tiny_tokenizer(path)  # model ids = tokenizer ids
    _save_random_model(config, path, seed)
    return path


def _save_random_model(config, path: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # make the random model less flat, so greedy choices are clear-cut
        for name, p in model.named_parameters():
            if p.dim() >= 2:   # matrices, and the experts' stacks of them
                p.normal_(0.0, 0.08)
            elif name.endswith("_proj.bias") or (config.model_type == "gpt_oss"
                                                 and name.endswith(("bias", "sinks"))):
                p.normal_(0.0, 0.5)   # zero or near it at init: make them matter
    model.save_pretrained(path)


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


def save_tiny_tokenizer(path: Path, special_tokens: tuple[str, ...] = ("<eos>", "<bos>"),
                        corpus: list[str] = _CORPUS, words: tuple[str, ...] = (),
                        **named_tokens) -> int:
    """Train and save the tokenizer; returns its vocabulary size. `words`: texts that are
    one token each (and decode as the text they are). `named_tokens`: its eos/bos/pad
    tokens (default `<eos>`, `<bos>`, `<eos>`) and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(list(words))
    named = {"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<eos>", **named_tokens}
    PreTrainedTokenizerFast(tokenizer_object=tok, **named).save_pretrained(path)
    return tok.get_vocab_size()


# --- gpt-oss and the harmony format ---------------------------------------------------

HARMONY_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftext|>", "<|start|>", "<|end|>",
                          "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
# The harmony format as gpt-oss's hub template writes it (after OpenAI's public harmony
# docs), without tools and without the current date (so renders are reproducible): the
# system message carries the reasoning effort, a system prompt becomes the developer's
# instructions, earlier turns keep only their final answer, and the prompt ends with
# the opened assistant header.
HARMONY_CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
  {%- if message.role == "user" -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: {{ reasoning_effort if reasoning_effort is defined else "medium" }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- for message in messages -%}
  {%- if message.role in ("system", "developer") -%}
<|start|>developer<|message|># Instructions

{{ message.content }}<|end|>
  {%- elif message.role == "assistant" -%}
    {%- if message.thinking and loop.index0 > ns.last_user -%}
<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>
    {%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
  {%- else -%}
<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""
_HARMONY_CORPUS = _CORPUS + [
    "analysis final commentary assistant user developer system Reasoning: low medium high",
    "User asks what two plus two is. The answer is four. Let me think about it.",
    "You are ChatGPT, a large language model trained by OpenAI. Knowledge cutoff: 2024-06",
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
    "# Instructions to=functions.get_weather json {\"location\": \"Paris\"} caf\u00e9 \u00fcber",
] * 10


def gpt_oss_config(**overrides):
    """A tiny gpt-oss: sinks, a sliding layer (window 8, shorter than the test prompts)
    then a full one, 4 experts (top 2) and YaRN over an original context of 64."""
    from transformers import GptOssConfig

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"],
                  max_position_embeddings=256, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                   "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                   "original_max_position_embeddings": 64})
    return GptOssConfig(**{**fields, **overrides})


def save_tiny_harmony_model(path: Path, seed: int = 0, words: tuple[str, ...] = (),
                            **config_overrides) -> Path:
    """A tiny random gpt-oss with the harmony tokenizer (plus `words`, a token each);
    `<|return|>`, `<|endoftext|>` and `<|call|>` end a sequence, as in gpt-oss's
    generation config."""
    from transformers import PreTrainedTokenizerFast

    vocab_size = save_tiny_tokenizer(path, HARMONY_SPECIAL_TOKENS, _HARMONY_CORPUS,
                                     eos_token="<|return|>", bos_token="<|startoftext|>",
                                     pad_token="<|endoftext|>", words=words,
                                     chat_template=HARMONY_CHAT_TEMPLATE)
    to_id = PreTrainedTokenizerFast.from_pretrained(path).convert_tokens_to_ids
    eos = [to_id("<|return|>"), to_id("<|endoftext|>"), to_id("<|call|>")]
    config = gpt_oss_config(vocab_size=vocab_size, eos_token_id=eos,
                            pad_token_id=to_id("<|endoftext|>"), **config_overrides)
    _save_random_model(config, path, seed)
    return path


def save_mxfp4_copy(model_dir: Path, path: Path, seed: int = 0) -> Path:
    """`model_dir`'s gpt-oss with its experts replaced by random MXFP4 weights, stored as
    the hub stores them (`*_blocks`, `*_scales`, and `quant_method` "mxfp4" in config.json)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, path, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        num_experts, in_dim, out_dim = tensors.pop(name).shape                 # input-major
        groups = (num_experts, out_dim, in_dim // 32)
        tensors[name + "_blocks"] = torch.randint(0, 256, (*groups, 16), generator=gen,
                                                  dtype=torch.uint8)
        # Scales of 2**-9 to 2**-6: weights up to 6/64, about as large as the bf16 ones.
        tensors[name + "_scales"] = torch.randint(118, 122, groups, generator=gen,
                                                  dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def save_scripted_harmony_model(path: Path, script: list[str], scale: float = 100.0,
                                words: tuple[str, ...] = (), **config_overrides) -> Path:
    """A tiny harmony gpt-oss that, greedily, writes `script` (a list of texts whose
    tokens follow each other) after the generation prompt's last token, then repeats the
    script's last token (if it is new to the script): a random model never writes harmony's channels by itself.

    Attention and expert outputs are zeroed, so the last hidden state is the input
    token's own normalised embedding `f_t`, and each successor's unembedding row is the
    sum of `scale * f_t / |f_t|` over the tokens `t` it follows: the logits are then
    largest for the token's successor (random 64-d embeddings are far from parallel).
    Every token of the script must be followed by one token only: `words`, one token
    each, let a script repeat a character."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedTokenizerFast

    save_tiny_harmony_model(path, words=words, **config_overrides)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    prompt_end = tok.encode("<|start|>assistant", add_special_tokens=False)[-1]
    ids = [prompt_end] + [i for text in script for i in tok.encode(text, add_special_tokens=False)]
    pairs = list(zip(ids, ids[1:]))
    successors = dict(pairs)
    if len(successors) != len(set(pairs)):
        raise ValueError(f"a token of the script is followed by two different tokens: {ids}")
    successors.setdefault(ids[-1], ids[-1])
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("o_proj.weight", "o_proj.bias",
                                                   "experts.down_proj", "down_proj_bias"))]:
        tensors[name].zero_()
    embed = tensors["model.embed_tokens.weight"].float()                 # [vocab, hidden]
    normed = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + 1e-5)
    normed = normed * tensors["model.norm.weight"].float()
    unembed = torch.zeros_like(tensors["lm_head.weight"])               # [vocab, hidden]
    for token, successor in successors.items():
        unembed[successor] += scale * normed[token] / normed[token].norm()
    tensors["lm_head.weight"] = unembed
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
