"""Build a model from a Hugging Face safetensors directory (sharded or not).

MXFP4 weights (gpt-oss checkpoints, `quant_method` "mxfp4") are dequantized as they are
read, unless the model keeps them packed (`ModelConfig.packed_experts`); the progress bar
counts a file's tensors, the dequantized ones included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from engine.layers.batch_invariant import enable as enable_batch_invariant
from engine.models.mxfp4 import Mxfp4Pairs
from engine.models.registry import model_class

# Hugging Face keeps these buffers in some checkpoints; we recompute them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What the engine never runs, skipped unread as transformers skips it: a vision-language
# checkpoint's vision tower, and multi-token-prediction heads (Qwen3.5, DeepSeek-V3).
IGNORED_PREFIXES = ("model.visual.", "mtp.")


def load_model(model_dir: str | Path, cfg: ModelConfig, device: str | torch.device,
               dtype: torch.dtype, progress: bool = True,
               batch_invariant: bool = False) -> nn.Module:
    """The model, its weights loaded; with `batch_invariant`, built for that mode
    (engine.layers.batch_invariant)."""
    # Built on the meta device: no time is spent on a random init that loading overwrites.
    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.rotary.reset_cache()
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)     # elements written so far, of each parameter
    with torch.no_grad():
        for path, hf_name, tensor in _checkpoint_tensors(Path(model_dir), cfg, dtype, device,
                                                         progress):
            name, index = model.param_slice(hf_name)
            if name not in params:
                raise ValueError(f"{path.name}: unexpected weight {hf_name!r}")
            target = params[name] if index is None else params[name][index]
            target.copy_(model.checkpoint_tensor(hf_name, tensor))
            filled[name] += target.numel()
    # A fused parameter (q/k/v, gate/up, every expert) is whole only once all its parts are.
    missing = [name for name, param in params.items() if filled[name] < param.numel()]
    if missing:
        raise ValueError(f"{model_dir}: weights missing for {sorted(missing)[:5]}")
    if batch_invariant:
        enable_batch_invariant(model)
    return model.eval()


def _ignored(hf_name: str, cfg: ModelConfig) -> bool:
    return (hf_name.endswith(IGNORED_SUFFIXES) or hf_name.startswith(IGNORED_PREFIXES)
            or (cfg.tie_word_embeddings and hf_name == "lm_head.weight"))


def _checkpoint_tensors(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype,
                        device: str | torch.device,
                        progress: bool) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, Hugging Face name, tensor) of every weight to load, MXFP4 pairs dequantized."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    dequantizes = cfg.quantization == "mxfp4" and not cfg.packed_experts
    mxfp4 = Mxfp4Pairs(dtype, device) if dequantizes else None
    for path in files:
        with safe_open(path, framework="pt") as f:
            for hf_name in tqdm(list(f.keys()), desc=f"loading {path.name}", disable=not progress,
                                leave=False):
                if _ignored(hf_name, cfg):
                    continue
                tensor = f.get_tensor(hf_name)
                if mxfp4 is not None and mxfp4.is_half(hf_name):
                    paired = mxfp4.add(hf_name, tensor)   # dequantized with its other half
                    if paired is None:
                        continue
                    hf_name, tensor = paired
                yield path, hf_name, tensor
    if mxfp4 is not None and mxfp4.unpaired:
        raise ValueError(f"{model_dir}: MXFP4 tensors without their other half: "
                         f"{mxfp4.unpaired[:5]}")
