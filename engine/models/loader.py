"""Build a model from a Hugging Face safetensors directory (sharded or not)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from engine.models.registry import model_class

# Hugging Face keeps these buffers in some checkpoints; we recompute them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What the engine never runs, skipped unread as transformers skips it: a vision-language
# checkpoint's vision tower, and multi-token-prediction heads (Qwen3.5, DeepSeek-V3).
IGNORED_PREFIXES = ("model.visual.", "mtp.")


def load_model(model_dir: str | Path, cfg: ModelConfig, device: str | torch.device,
               dtype: torch.dtype, progress: bool = True) -> nn.Module:
    # Built on the meta device: no time is spent on a random init that loading overwrites.
    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.rotary.reset_cache()
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)     # elements written so far, of each parameter
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    with torch.no_grad():
        for path in files:
            with safe_open(path, framework="pt") as f:
                for hf_name in tqdm(list(f.keys()), desc=f"loading {path.name}", disable=not progress,
                                    leave=False):
                    if _ignored(hf_name, cfg):
                        continue
                    name, index = model.param_slice(hf_name)
                    if name not in params:
                        raise ValueError(f"{path.name}: unexpected weight {hf_name!r}")
                    target = params[name] if index is None else params[name][index]
                    target.copy_(f.get_tensor(hf_name))
                    filled[name] += target.numel()
    # A fused parameter (q/k/v, gate/up, every expert) is whole only once all its parts are.
    missing = [name for name, param in params.items() if filled[name] < param.numel()]
    if missing:
        raise ValueError(f"{model_dir}: weights missing for {sorted(missing)[:5]}")
    return model.eval()


def _ignored(hf_name: str, cfg: ModelConfig) -> bool:
    return (hf_name.endswith(IGNORED_SUFFIXES) or hf_name.startswith(IGNORED_PREFIXES)
            or (cfg.tie_word_embeddings and hf_name == "lm_head.weight"))
