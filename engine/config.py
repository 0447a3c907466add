"""Model and engine configuration records."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_KV_CACHE_BYTES = 1 << 30
# How steps serve checkpoints (engine.checkpoints.lora_serving): "auto" merges a step's
# one checkpoint and mixes several unmerged; "merged" never mixes; "unmerged" never merges.
LORA_MODES = ("auto", "merged", "unmerged")
QUANTIZATIONS = (None, "mxfp4")     # EngineConfig.quantization: what stays packed


@dataclass(frozen=True)
class LoraTarget:
    """A module a LoRA adapter may adapt: the shape of its delta `B @ A`, [out, in]; for
    the experts of a MoE layer, one such delta per expert."""

    out_features: int
    in_features: int     # for the input embedding: the vocabulary (A is a lookup table)
    num_experts: int = 0  # > 0: 3-D factors, A [E or 1, r, in] and B [E or 1, out, r]


@dataclass(frozen=True)
class LinearAttentionSpec:
    """The linear-attention (Gated DeltaNet) layers of a hybrid model, which keep a
    fixed-size state per sequence instead of a KV cache."""

    layers: tuple[int, ...]    # their indices; every other layer is attention on the KV cache
    num_key_heads: int
    num_value_heads: int       # a multiple of num_key_heads: q and k heads are repeated
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_shape(self) -> tuple[int, int]:
        """One sequence's conv state: the last kernel - 1 inputs of the q, k and v channels."""
        return (2 * self.key_dim + self.value_dim, self.conv_kernel - 1)

    @property
    def recurrent_shape(self) -> tuple[int, int, int]:
        """One sequence's recurrent state, kept in float32 whatever the model's dtype."""
        return (self.num_value_heads, self.key_head_dim, self.value_head_dim)

    def state_bytes(self, dtype: torch.dtype) -> int:
        """One sequence's states over all linear-attention layers (conv states in `dtype`)."""
        conv, rec = self.conv_shape, self.recurrent_shape
        per_layer = conv[0] * conv[1] * dtype.itemsize + rec[0] * rec[1] * rec[2] * 4
        return len(self.layers) * per_layer


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts every family shares, read from `config.json`.

    A family with more (experts, layer types) subclasses it and extends `from_dict`;
    `engine.models.registry.load_model_config` picks the family by `model_type`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool          # Qwen2, and `attention_bias` models: bias on q/k/v projections
    o_bias: bool            # `attention_bias` models (Qwen2 has none on o_proj): on o_proj
    qk_norm: bool           # Qwen3: per-head RMSNorm on q and k
    eos_token_ids: tuple[int, ...]
    quantization: str | None   # quantization_config.quant_method ("mxfp4": gpt-oss's experts)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The dims of a head that rope turns: all of them (Qwen3.5 turns a part)."""
        return self.head_dim

    @property
    def linear_attention(self) -> LinearAttentionSpec | None:
        """Hybrid families (Qwen3.5) override this; None: every layer is attention."""
        return None

    @property
    def num_attention_layers(self) -> int:
        """Layers with a KV cache."""
        spec = self.linear_attention
        return self.num_layers - (len(spec.layers) if spec else 0)

    @property
    def packed_experts(self) -> bool:
        """Whether the experts stay in the checkpoint's MXFP4 (`EngineConfig.quantization`):
        not dequantized at load, and not adaptable (no delta merges into packed weights)."""
        return False

    def served_with(self, quantization: str | None) -> "ModelConfig":
        """This config as the engine serves it with `EngineConfig.quantization`."""
        if quantization is None:
            return self
        raise ValueError(f"quantization {quantization!r}: a {self.model_type} model has no "
                         "packed weights to keep (only gpt-oss's MXFP4 experts)")

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "ModelConfig":
        """`cfg`: config.json; `generation_config`: generation_config.json (its EOS wins)."""
        return cls(**cls.common_fields(cfg, generation_config))

    @staticmethod
    def common_fields(cfg: dict, generation_config: dict | None = None) -> dict:
        model_type = cfg.get("model_type", "")
        num_heads = cfg["num_attention_heads"]
        # transformers >= 5 nests rope settings under `rope_parameters`; older configs
        # keep `rope_theta` and `rope_scaling` at the top level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = (generation_config or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return dict(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            o_bias=cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos_ids,
            quantization=(cfg.get("quantization_config") or {}).get("quant_method"),
        )


@dataclass
class EngineConfig:
    """Serving knobs. The KV cache holds `num_kv_blocks` blocks of `block_size` tokens;
    when `num_kv_blocks` is None it is derived from `kv_cache_memory` bytes, and when that
    is None too, from what the model leaves of `gpu_memory_utilization` of a CUDA card
    (vLLM's rule), or 1 GiB elsewhere."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64                  # sequences per step
    max_num_batched_tokens: int = 2048      # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None        # defaults to the model's max positions
    enable_prefix_caching: bool = True
    sampler_backend: str = "auto"           # "auto" | "triton" | "torch"
    checkpoint_root: str | None = None
    lora_cache_memory: int = 1 << 30        # bytes of adapter tensors kept for fast switching
    max_loras: int = 16                     # distinct adapters in one step (the base: none)
    max_cpu_loras: int | None = None        # adapters kept loaded (None: lora_cache_memory's)
    max_lora_rank: int = 64                 # the largest rank served; higher ones are refused
    lora_mode: str = "auto"                 # see LORA_MODES
    # A token's results depend on its own sequence only, bit for bit, whatever shares its
    # steps (engine.layers.batch_invariant; what it costs: BENCHMARKS.md). The mode serves
    # checkpoints merged, one per step ("auto" becomes "merged"): under "auto" a row's path
    # (merged weights, or the base plus its adapter) would follow which checkpoints share
    # its step, and merges start from an exact copy of the base, so a checkpoint's weights
    # are the same bits every time it is merged.
    batch_invariant: bool = False
    # "mxfp4": gpt-oss's experts stay packed as the checkpoint has them, a quarter of their
    # bfloat16 bytes (gpt-oss-120b fits one GPU), read packed by a Triton kernel on CUDA
    # and dequantized per product elsewhere (engine.layers.moe); None: dequantized once
    # at load, and adaptable.
    quantization: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, "
                             f"got {self.quantization!r}")
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if self.batch_invariant:
            if self.lora_mode == "unmerged":
                raise ValueError("batch_invariant serves checkpoints merged, one per step: "
                                 "it cannot go with lora_mode 'unmerged'")
            self.lora_mode = "merged"

    def kv_cache_bytes(self) -> int:
        """The KV cache's budget in bytes (call once the model's weights are loaded)."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        if torch.device(self.device).type != "cuda":
            return CPU_KV_CACHE_BYTES
        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        return max(0, int(total * self.gpu_memory_utilization) - (total - free))
