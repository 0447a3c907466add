"""Serve one LoRA checkpoint at a time by merging it into the live model's weights.

`activate(dir)` makes every weight equal `base + delta(dir)` (`None`: the base
model). Merging costs one small matmul per adapted module (per expert, for the experts
of a MoE layer), and the model then runs at full speed with no per-token LoRA work; the
scheduler batches requests of the same checkpoint so that switches are rare.

Switching never drifts the base: the first time a weight is modified, an exact copy
of it is kept, and every later merge or restore starts from that copy, so A -> B -> A
gives bit-identical weights. Only weights some adapter has touched are copied, but a
whole tensor at a time: an expert adapter copies every expert of its layers, most of a
MoE model (the README gives Qwen3-30B-A3B's figure). On a model with tied embeddings an
adapter on `lm_head` or on the input embedding unties them for as long as it is active
(PEFT applies each delta to its own module only), and the base re-ties them.

Only the engine thread may call `activate`: it rewrites weights the model is using.
Steps that mix checkpoints run the base weights (`activate(None)`) and add each row's
adapter from slots instead (engine.checkpoints.lora_serving decides, step by step); the
adapters both ways are read once into this manager's cache.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from engine.checkpoints.adapter import (
    MISSING,
    AdapterKey,
    LoraAdapter,
    LoraModule,
    adapter_key,
    load_adapter,
)
from engine.checkpoints.errors import CheckpointInvalid

LM_HEAD, EMBED = "lm_head.weight", "embed_tokens.weight"
Index = slice | tuple[int | slice, ...]   # the part of a parameter one module's delta fills


class AdapterCache:
    """Loaded adapters, least recently used evicted first, bounded by their tensors' bytes
    and by their number (vLLM's `max_cpu_loras`; None: bytes only)."""

    def __init__(self, max_bytes: int, max_count: int | None = None) -> None:
        self.max_bytes, self.max_count = max_bytes, max_count
        self.nbytes = 0
        self._entries: OrderedDict[AdapterKey, LoraAdapter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: AdapterKey) -> LoraAdapter | None:
        adapter = self._entries.get(key)
        if adapter is not None:
            self._entries.move_to_end(key)
        return adapter

    def put(self, key: AdapterKey, adapter: LoraAdapter) -> None:
        if key in self._entries or adapter.nbytes > self.max_bytes:
            return
        self._entries[key] = adapter
        self.nbytes += adapter.nbytes
        while self._over_bounds():
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def _over_bounds(self) -> bool:
        too_many = self.max_count is not None and len(self._entries) > self.max_count
        return too_many or self.nbytes > self.max_bytes


class LoraManager:
    def __init__(self, model: nn.Module, cache_bytes: int = 1 << 30, allow_pickle: bool = False,
                 backup_device: str | torch.device | None = None, max_cached: int | None = None,
                 max_rank: int | None = None, keep_base: bool = True) -> None:
        """`cache_bytes` and `max_cached` bound the cached adapters (float32 factors on the
        model's device); `backup_device` holds the exact base copies (default: the model's
        device); adapters of a rank above `max_rank` are refused. `keep_base=False` merges
        one adapter for good (an export): no base copies, no second `activate`."""
        self.model = model
        self.keep_base = keep_base
        self.cache = AdapterCache(cache_bytes, max_cached)
        self.allow_pickle, self.max_rank = allow_pickle, max_rank
        self._device = model.embed_tokens.weight.device
        self._backup_device = torch.device(backup_device) if backup_device else self._device
        self._tied = model.cfg.tie_word_embeddings
        self._base: dict[str, torch.Tensor] = {}   # exact copy of every base weight ever modified
        self._modified: set[str] = set()           # parameters that now hold base + delta
        self._active: AdapterKey | None = None

    @property
    def base_copy_bytes(self) -> int:
        """Memory held by the exact base copies (on `backup_device`)."""
        return sum(t.nbytes for t in self._base.values())

    @property
    def active(self) -> Path | None:
        """The directory of the adapter merged now (None: the base model)."""
        return None if self._active is None else self._active[0]

    @torch.no_grad()
    def activate(self, checkpoint_dir: Path | None) -> None:
        """Make the model serve `checkpoint_dir`'s adapter (None: the base model).

        Raises CheckpointInvalid if the adapter cannot be read; the model is then unchanged.
        """
        key = None if checkpoint_dir is None else adapter_key(Path(checkpoint_dir))
        if not self.keep_base and self._active is not None:
            raise RuntimeError("this LoraManager keeps no base copies: it merges once")
        deleted_in_use = key is not None and key[1:] == MISSING and key[0] == self.active
        if key == self._active or deleted_in_use:
            return   # unchanged; or deleted while in use: finish its requests with what is merged
        targets = self._targets(None if key is None else self.load(key))
        for name in self._modified - targets.keys():
            self._restore(name)
        if LM_HEAD in targets and self.model.lm_head.weight is self.model.embed_tokens.weight:
            # Untie: the head gets its own copy of the (still base) embedding.
            self.model.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.clone(),
                                                     requires_grad=False)
        for name, parts in targets.items():
            self._merge(name, parts)
        self._modified = set(targets)
        self._active = key

    def load(self, key: AdapterKey) -> LoraAdapter:
        """The adapter `key` names, from the cache or read now (CheckpointInvalid if unreadable)."""
        adapter = self.cache.get(key)
        if adapter is None:
            try:
                adapter = load_adapter(key[0], self.model.cfg, self.allow_pickle, self._device,
                                       self.max_rank)
            except CheckpointInvalid as e:
                raise CheckpointInvalid(f"Checkpoint `{key[0].name}` cannot be served: {e}") from None
            self.cache.put(key, adapter)
        return adapter

    def _targets(self, adapter: LoraAdapter | None) -> dict[str, list[tuple[LoraModule, Index]]]:
        """Our parameter name -> the adapter modules merged into it, with the part each
        writes (rows of a fused projection; for experts, their rows of every expert)."""
        targets: dict[str, list[tuple[LoraModule, Index]]] = {}
        for module in adapter.modules if adapter else []:
            name, index = self.model.param_slice(module.module + ".weight")
            targets.setdefault(name, []).append((module, slice(None) if index is None else index))
        if self._tied and (LM_HEAD in targets or EMBED in targets):
            # Untied, both halves are served: one of them may just hold the base.
            targets.setdefault(LM_HEAD, [])
            targets.setdefault(EMBED, [])
        return targets

    def _merge(self, name: str, parts: list[tuple[LoraModule, Index]]) -> None:
        param, base = self.model.get_parameter(name), self._base_copy(name)
        covered = sum(param[index].numel() for _, index in parts)
        if name in self._modified and covered < param.numel():
            param.copy_(base)   # what no module of this adapter writes must hold the base
        for module, index in parts:
            module.merge_into(param[index], base[index].to(self._device))

    def _restore(self, name: str) -> None:
        if self._tied and name == LM_HEAD:
            self.model.tie_weights()   # the embedding itself is restored as its own target
        else:
            self.model.get_parameter(name).copy_(self._base[name])

    def _base_copy(self, name: str) -> torch.Tensor:
        # A weight is copied before it is first modified, so the live weight is still base.
        # A tied head's base is the embedding's. Without copies, the base is the live weight
        # itself, merged in place (an untied head is already its own copy).
        if not self.keep_base:
            return self.model.get_parameter(name).detach()
        source = EMBED if self._tied and name == LM_HEAD else name
        if source not in self._base:
            weight = self.model.get_parameter(source).detach()
            self._base[source] = weight.to(self._backup_device, copy=True)
        return self._base[source]

