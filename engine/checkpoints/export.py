"""Export a checkpoint as a plain Hugging Face model: the base with the adapter merged.

What `pokeserve export CHECKPOINT OUT_DIR` writes is what vLLM and SGLang serve unchanged,
with tensor parallelism: `config.json`, safetensors shards with their index in the hub's
layout of the family (engine.models.hub_weights), the tokenizer files with the
checkpoint's own chat template when it ships one (else the base's),
`generation_config.json`, and the base's other top-level files (license, processor
configs). Merged models are the path that always works: vLLM refuses the service's
unembed adapters.

The merge is the engine's own (LoraManager, without base copies) in the export dtype,
each delta computed in float32 and cast once: the weights written are the weights
pokeserve serves in that dtype. A tied-embedding base whose adapter touches the head or
the embedding is exported untied: `lm_head.weight` is written, and config.json says
`tie_word_embeddings: false` and `pokeserve_export.untied_lm_head: true`.

Everything is written into a temporary sibling of OUT_DIR renamed into place last, so an
interrupted export leaves nothing at OUT_DIR (a killed one leaves a hidden
`.OUT_DIR.partial-*` beside it). An existing OUT_DIR is replaced only with `force`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from engine.checkpoints.merge import LoraManager
from engine.checkpoints.store import CheckpointInfo, CheckpointStore
from engine.models.default_model import fetch_default_model
from engine.models.hub_weights import HubCheckpoint, exported_weights, save_shards
from engine.models.loader import load_model
from engine.models.registry import load_model_config
from engine.text.tokenizer import Tokenizer

MAX_SHARD_BYTES = 5 * 10**9   # the hub's usual shard size
# Base files not copied: the weights (rewritten) and other formats of them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")   # without generation_config.json


def export_checkpoint(checkpoint: str | None, out_dir: str | Path, *,
                      model_dir: str | Path | None = None, checkpoint_root: str | Path | None = None,
                      dtype: torch.dtype | None = None, force: bool = False, progress: bool = True,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the base model `model_dir` (default: the embedded one) with `checkpoint`
    (a name the checkpoint store resolves under `checkpoint_root`; None or the base's own
    name: no adapter) merged, as a Hugging Face model directory `out_dir`.

    `dtype` defaults to the base's own. Raises CheckpointError for a checkpoint that
    cannot be served, FileExistsError for an existing `out_dir` without `force`.
    """
    model_dir = Path(model_dir) if model_dir else fetch_default_model()
    out_dir = Path(out_dir).absolute()
    _refuse_existing(out_dir, force)
    cfg = load_model_config(model_dir)
    info = (CheckpointStore(checkpoint_root, model_dir.name, cfg).resolve(checkpoint)
            if checkpoint else None)
    config = json.loads((model_dir / "config.json").read_text())
    dtype = dtype or _config_dtype(config)
    model = load_model(model_dir, cfg, "cpu", dtype, progress=progress)
    if info is not None:
        LoraManager(model, keep_base=False).activate(info.path)
    untied = cfg.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        _copy_other_files(model_dir, tmp)
        base = HubCheckpoint.open(model_dir)
        save_shards(exported_weights(model, base), tmp, max_shard_bytes, progress,
                    total=len(base.names) + int(untied))
        config = _export_config(model, config, dtype, info, untied)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_generation_config(model_dir, config, tmp)
        _write_tokenizer(model_dir, info, tmp)
        _move_into_place(tmp, out_dir, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already once moved into place
    return out_dir


def _refuse_existing(out_dir: Path, force: bool) -> None:
    if not force and (out_dir.exists() or out_dir.is_symlink()):
        raise FileExistsError(f"{out_dir} already exists; --force replaces it")


def _config_dtype(config: dict) -> torch.dtype:
    text = config.get("text_config") or {}
    name = (config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
            or text.get("torch_dtype") or "bfloat16")
    return getattr(torch, name)


def _export_config(model, config: dict, dtype: torch.dtype, info: CheckpointInfo | None,
                   untied: bool) -> dict:
    config = dict(config)
    # transformers 5 reads `dtype`, older releases (and the engines pinned to them) `torch_dtype`.
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    config["pokeserve_export"] = {"checkpoint": info.name if info else None,
                                  "untied_lm_head": untied}
    hook = getattr(model, "export_config", None)
    return hook(config) if hook is not None else config


def _copy_other_files(model_dir: Path, out: Path) -> None:
    """The base's top-level files that are not weights; config, generation config and
    tokenizer files are rewritten over them."""
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in WEIGHT_FILES:
            shutil.copy2(path, out / path.name)


def _write_generation_config(model_dir: Path, config: dict, out: Path) -> None:
    if (model_dir / "generation_config.json").is_file():
        return   # copied with the other files
    generation = {key: config[key] for key in GENERATION_KEYS if key in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _write_tokenizer(model_dir: Path, info: CheckpointInfo | None, out: Path) -> None:
    tokenizer = Tokenizer(model_dir).hf
    if info is not None and info.chat_template is not None:
        tokenizer.chat_template = info.chat_template.read_text()
    tokenizer.save_pretrained(out)


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    _refuse_existing(out_dir, force)
    if not (out_dir.exists() or out_dir.is_symlink()):
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    try:
        out_dir.rename(old / out_dir.name)
        try:
            tmp.rename(out_dir)
        except BaseException:
            (old / out_dir.name).rename(out_dir)   # the old one back, untouched
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
