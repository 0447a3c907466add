"""A model's weights in its Hugging Face hub layout: the inverse of the loader.

An export (engine.checkpoints.export) writes a family's weights back under the names and
shapes its hub checkpoints use, so that other engines load them unchanged. The loader
copies each hub tensor into the rows `param_slice(name)` gives of one of our parameters;
reading those rows back inverts it, splitting fused projections (`qkv_proj`,
`gate_up_proj`) into q/k/v and gate/up again. Hub tensors the engine does not load (a
vision tower, cached rotary frequencies) are copied through unchanged.

The per-family hook. A model class whose weights cannot be read back this way (a loader
that converts on the way in: dequantizes, transposes, stacks under other names) defines

    def export_weights(self, base: HubCheckpoint) -> Iterator[tuple[str, torch.Tensor]]

yielding every tensor of the exported checkpoint exactly once, by hub name, in the dtype
it is to be saved in: its own parameters (merged, as they are served) converted back, and
`base.get(name)` for what it copies through. It may `yield from hub_weights(self, base,
names)` for the names the default handles. Two lighter hooks:
- `hub_names(self, names: list[str]) -> list[str]`: the hub's tensor names for a base
  holding `names`, when they differ but `param_slice` maps both (Qwen3-MoE: a base with
  transformers' fused experts is written with one tensor per expert, as the hub has it);
- `export_config(self, config: dict) -> dict`: config.json as exported, when it must
  change too (e.g. a quantization_config that no longer applies).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

UNTIED_HEAD = "lm_head.weight"   # a tied model's head, once an adapter gave it its own weight
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubCheckpoint:
    """The tensors of a Hugging Face model directory, by name, read on demand."""

    files: dict[str, Path]   # tensor name -> the safetensors file holding it

    @classmethod
    def open(cls, model_dir: str | Path) -> "HubCheckpoint":
        files: dict[str, Path] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        return cls(files)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)


def exported_weights(model: nn.Module, base: HubCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """The family's `export_weights` if it has one, else the default `hub_weights`."""
    hook = getattr(model, "export_weights", None)
    return hook(base) if hook is not None else hub_weights(model, base)


def hub_weights(model: nn.Module, base: HubCheckpoint,
                names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The default export of the tensors `names` (default: all of the base's, under the
    family's `hub_names`): each read back from the rows `param_slice` gives it, or copied
    through from the base when the engine does not load it; then a head an adapter untied,
    if the base stores none.

    Over all names, ValueError if a parameter of the model is left out: that family needs
    its own `export_weights`. Given `names`, the caller answers for the rest.
    """
    params = dict(model.named_parameters())   # a head still tied is not listed apart
    covered = set()
    hub_names = getattr(model, "hub_names", None)
    everything = names is None
    if everything:
        names = base.names if hub_names is None else hub_names(base.names)
    for hf_name in names:
        name, rows = model.param_slice(hf_name)
        if name not in params:
            yield hf_name, base.get(hf_name)
            continue
        covered.add(name)
        weight = params[name].detach()
        yield hf_name, weight if rows is None else weight[rows]
    if not everything:
        return
    missing = sorted(params.keys() - covered - {UNTIED_HEAD})
    if missing:
        raise ValueError(f"no hub name for {missing[:5]}: {type(model).__name__} needs its own "
                         "export_weights")
    if UNTIED_HEAD in params and UNTIED_HEAD not in covered:
        yield UNTIED_HEAD, params[UNTIED_HEAD].detach()


def save_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int,
                progress: bool = True, total: int | None = None) -> None:
    """Write (name, tensor) pairs as the hub does: one `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` of at most `max_shard_bytes` each (one tensor
    larger than that gets a shard of its own) and their index."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    size = total_size = 0

    def flush() -> None:
        save_file(shard, out_dir / f".shard-{len(shards)}", metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tqdm(tensors, desc="writing tensors", total=total, disable=not progress):
        if name in seen:
            raise ValueError(f"{name} is exported twice")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.clone(memory_format=torch.contiguous_format)   # views share storage
        size, total_size = size + nbytes, total_size + nbytes
    flush()
    if len(shards) == 1:
        (out_dir / ".shard-0").rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / f".shard-{i}").rename(out_dir / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
