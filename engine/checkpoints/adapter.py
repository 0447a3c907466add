"""LoRA adapters: read them, check them against the base model, compute merged weights.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
(PEFT's layout). Each adapted module has two factors, `lora_A` [r, in] and `lora_B`
[out, r]; serving it means `W + scale * (B @ A)`, with `scale = alpha / r` (or
`alpha / sqrt(r)` under rsLoRA) and `r`, `alpha` overridable per module by
`rank_pattern` / `alpha_pattern`.

Accepted tensor names, `<m>` being a module of the Hugging Face model:
- PEFT: `base_model.model.<m>.lora_A.weight`; the input embedding as
  `base_model.model.model.embed_tokens.lora_embedding_A` (no `.weight`);
- the training service: the output head as `model.unembed_tokens` (means `lm_head`),
  a layer's attention as `<layer>.attn` in gpt-oss adapters (means `self_attn`),
  the input embedding with plain `lora_A.weight` / `lora_B.weight`, the experts of
  a MoE layer as 3-D factors `<layer>.mlp.experts.w1` (gate_proj), `w3` (up_proj) and
  `w2` (down_proj): A [E or 1, r, in] and B [E or 1, out, r], where a leading 1 is one
  factor shared by every expert (expert e's delta is `B[e] @ A[e]`), and for Qwen3.5
  separate `in_proj_q`, `in_proj_k`, `in_proj_v` factors for slices of the fused
  `in_proj_qkv` (the model's `param_slice` places them; an adapter names these or
  `in_proj_qkv`, never both);
- a vision-language model's text modules as `model.language_model.<...>`.
For the input embedding A is [r, vocab] (used as a lookup) and B is [hidden, r], so its
delta is `(B @ A).T`. A MoE layer's router (`mlp.gate`, gpt-oss's `mlp.router`: a linear
layer hidden -> E) merges like any other linear module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.checkpoints.adapter_config import AdapterConfig
from engine.checkpoints.errors import CheckpointInvalid
from engine.config import LoraTarget, ModelConfig
from engine.models.registry import lora_targets, model_class

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# How a loaded adapter is known: (resolved directory, inode, mtime_ns, size of its weights
# file), so that a rewritten checkpoint is a new adapter.
AdapterKey = tuple[Path, int, int, int]
MISSING = (0, 0, 0)   # the key's file part when there is no weights file to read
LM_HEAD, EMBEDDING = "lm_head", "model.embed_tokens"
# Module names the training service uses for what Hugging Face calls otherwise.
MODULE_ALIASES = {"model.unembed_tokens": LM_HEAD}
# The training service's names for the expert projections of a MoE layer.
EXPERT_MODULES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_MODULE = re.compile(r"\.experts\.(w[123])$")
# ... and for a layer's attention in gpt-oss adapters (`model.layers.3.attn.q_proj`).
_ATTENTION_ALIAS = re.compile(r"^(model\.layers\.\d+)\.attn\.")
# A vision-language checkpoint (Qwen3.5) nests the text model: PEFT over it names
# `model.language_model.layers...` what the text model calls `model.layers...`.
LANGUAGE_MODEL_PREFIX = re.compile(r"^model\.language_model\.")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_LAYER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of the served model, with float32 factors."""

    module: str           # Hugging Face name in the served model: `model.layers.0.mlp.up_proj`, `lm_head`
    scale: float
    lora_a: torch.Tensor  # [r, in]; input embedding [r, vocab]; experts [E or 1, r, in]
    lora_b: torch.Tensor  # [out, r]; input embedding [hidden, r]; experts [E or 1, out, r]

    def merge_into(self, out: torch.Tensor, base: torch.Tensor) -> None:
        """out = base + scale * delta, computed in float32 and cast once.

        `base`, `out`: the module's weight [out, in] (the embedding's is [vocab, hidden],
        hence its transposed delta; the experts' [E, out, in], one delta per expert);
        `out` is the live weight's slice.
        """
        if self.lora_a.dim() == 3:
            num_experts = out.shape[0]
            a = self.lora_a.expand(num_experts, -1, -1)   # a shared factor serves every expert
            b = self.lora_b.expand(num_experts, -1, -1)
            for e in range(num_experts):
                _add_scaled_product(out[e], base[e], b[e], a[e], self.scale)
        elif self.module == EMBEDDING:
            _add_scaled_product(out, base, self.lora_a.T, self.lora_b.T, self.scale)
        else:
            _add_scaled_product(out, base, self.lora_b, self.lora_a, self.scale)


def _add_scaled_product(out: torch.Tensor, base: torch.Tensor, mat1: torch.Tensor,
                        mat2: torch.Tensor, scale: float) -> None:
    """out = base + scale * (mat1 @ mat2), in float32, cast to out's dtype once."""
    if out.dtype == torch.float32:
        torch.addmm(base, mat1, mat2, alpha=scale, out=out)   # no temporary
    else:
        out.copy_(torch.addmm(base.float(), mat1, mat2, alpha=scale))


@dataclass(frozen=True)
class LoraAdapter:
    config: AdapterConfig
    modules: list[LoraModule]

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules)

    @property
    def adapts_experts(self) -> bool:
        """Whether it holds 3-D expert factors (those are served merged only)."""
        return any(m.lora_a.dim() == 3 for m in self.modules)


def adapter_key(checkpoint_dir: Path) -> AdapterKey:
    path = checkpoint_dir.resolve()
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        try:
            stat = (path / name).stat()
        except FileNotFoundError:
            continue
        return path, stat.st_ino, stat.st_mtime_ns, stat.st_size
    return (path, *MISSING)   # nothing to read: load_adapter says what is missing


def inspect_adapter(adapter_dir: Path, cfg: ModelConfig, allow_pickle: bool = False,
                    max_rank: int | None = None) -> AdapterConfig:
    """Check an adapter against the base model (and its ranks against `max_rank`) from its
    config and tensor headers only (cheap: no tensor is read). Raises CheckpointInvalid
    naming the problem."""
    config = AdapterConfig.from_dir(adapter_dir)
    with _open_weights(adapter_dir, allow_pickle) as tensors:
        _plan(config, {key: tensors.shape(key) for key in tensors.keys()}, cfg, max_rank)
    return config


def load_adapter(adapter_dir: Path, cfg: ModelConfig, allow_pickle: bool = False,
                 device: str | torch.device = "cpu", max_rank: int | None = None) -> LoraAdapter:
    """Read and check an adapter; factors come back in float32 on `device`."""
    config = AdapterConfig.from_dir(adapter_dir)
    with _open_weights(adapter_dir, allow_pickle) as tensors:
        plan = _plan(config, {key: tensors.shape(key) for key in tensors.keys()}, cfg, max_rank)
        modules = [LoraModule(module, scale,
                              tensors.get(a_key).to(device, torch.float32),
                              tensors.get(b_key).to(device, torch.float32))
                   for module, (a_key, b_key, scale) in plan.items()]
    _check_finite(modules)
    return LoraAdapter(config, modules)


def _check_finite(modules: list[LoraModule]) -> None:
    # One check over all factors at once: hundreds of tiny checks cost more in thread
    # wake-ups than in arithmetic. Only a failure looks for the culprit.
    if torch.isfinite(torch.cat([t.flatten() for m in modules for t in (m.lora_a, m.lora_b)])).all():
        return
    bad = next(m for m in modules if not (m.lora_a.isfinite().all() and m.lora_b.isfinite().all()))
    raise CheckpointInvalid(f"{bad.module}: the LoRA factors hold NaN or infinite values")


def _plan(config: AdapterConfig, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
          max_rank: int | None = None) -> dict[str, tuple[str, str, float]]:
    """Served module name -> (A key, B key, scale), after checking every tensor's name and shape."""
    targets = lora_targets(cfg)
    _check_target_modules(config, targets, cfg)
    factors: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _KEY.match(key)
        if not match:
            raise CheckpointInvalid(f"unexpected tensor {key!r} (only LoRA factors lora_A/lora_B are "
                                    "supported; save PEFT adapters with save_embedding_layers=False)")
        factors.setdefault(match["module"], {})[match["ab"]] = key
    if not factors:
        raise CheckpointInvalid("the adapter holds no LoRA tensors")
    plan = {}
    for name, keys in factors.items():
        module = _served_module(name, targets, cfg)
        if set(keys) != {"A", "B"}:
            raise CheckpointInvalid(f"{name}: lora_{'B' if 'A' in keys else 'A'} is missing")
        if module in plan:
            raise CheckpointInvalid(f"{name}: {module} is adapted twice")
        rank = _rank(name, targets[module], shapes[keys["A"]], shapes[keys["B"]])
        if max_rank is not None and rank > max_rank:
            raise CheckpointInvalid(f"{name}: LoRA rank {rank} is above the largest rank this "
                                    f"server holds, {max_rank} (serve it with --max-lora-rank "
                                    f"{rank} or more)")
        plan[module] = (keys["A"], keys["B"], config.scale(name, rank))
    _check_no_slice_of_an_adapted_module(plan, model_class(cfg.model_type))
    return plan


def _check_no_slice_of_an_adapted_module(plan: dict[str, tuple], family: type) -> None:
    """A module and a slice of it both adapted (Qwen3.5's `in_proj_q` and the `in_proj_qkv`
    it is part of: the service's and PEFT's names for the same rows) are refused, as a
    module adapted twice is: which delta the rows get would be a guess."""
    for module in plan:
        whole = family.fused_module(module)
        if whole in plan:
            raise CheckpointInvalid(f"{module}: a slice of {whole}, which is adapted too")


def _rank(name: str, target: LoraTarget, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """The rank of a module's factors, once their shapes are checked against its target."""
    out_dim, in_dim, experts = target.out_features, target.in_features, target.num_experts
    if experts:   # 3-D: one factor per expert, or one shared by every expert (a leading 1)
        leads_fit = len(a_shape) == len(b_shape) == 3 and {a_shape[0], b_shape[0]} <= {1, experts}
        a, b, lead = a_shape[1:], b_shape[1:], f"{experts} or 1, "
    else:
        leads_fit, a, b, lead = True, a_shape, b_shape, ""
    rank = a[0] if a else 0
    if not leads_fit or a != (rank, in_dim) or b != (out_dim, rank) or rank == 0:
        raise CheckpointInvalid(
            f"{name}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit this base model "
            f"(expected [{lead}r, {in_dim}] / [{lead}{out_dim}, r])")
    return rank


def _served_module(name: str, targets: dict[str, LoraTarget], cfg: ModelConfig) -> str:
    """The served model's module for an adapter's module name; refuses what we cannot merge."""
    served = LANGUAGE_MODEL_PREFIX.sub("model.", name)
    served = MODULE_ALIASES.get(served, served)
    served = _EXPERT_MODULE.sub(lambda m: f".experts.{EXPERT_MODULES[m[1]]}", served)
    served = _ATTENTION_ALIAS.sub(r"\1.self_attn.", served)
    if served in targets:
        return served
    match = _LAYER.match(served)
    if match and int(match["layer"]) >= cfg.num_layers:
        raise CheckpointInvalid(f"{name}: layer {match['layer']} does not exist "
                                f"(the base model has {cfg.num_layers} layers)")
    if ".experts." in name:
        raise _unservable_experts(name, match, targets, cfg)
    raise CheckpointInvalid(f"{name}: unknown target module for a {cfg.model_type} model")


def _unservable_experts(name: str, layer: re.Match | None, targets: dict[str, LoraTarget],
                        cfg: ModelConfig) -> CheckpointInvalid:
    if cfg.packed_experts:
        return CheckpointInvalid(f"{name}: this server keeps the experts in MXFP4 (--quantization "
                                 "mxfp4), and an adapter of them cannot be merged into packed "
                                 "weights; serve the base without --quantization to adapt them")
    if not any(target.num_experts for target in targets.values()):
        return CheckpointInvalid(f"{name}: MoE expert factors, but this {cfg.model_type} model "
                                 "has no experts")
    if layer and not any(t.startswith(f"{layer[0]}mlp.experts.") for t in targets):
        return CheckpointInvalid(f"{name}: MoE expert factors, but layer {layer['layer']} of this "
                                 f"{cfg.model_type} model is dense")
    return CheckpointInvalid(f"{name}: unknown expert module (experts are adapted through the 3-D "
                             "factors `mlp.experts.w1`, `w2` and `w3`)")


def _check_target_modules(config: AdapterConfig, targets: dict[str, LoraTarget],
                          cfg: ModelConfig) -> None:
    """`target_modules` as a list names module leaves (PEFT matches them against the end
    of module names); each must be one this model has."""
    if not isinstance(config.target_modules, list):
        return
    # The service's expert names are accepted for any model: its default target list may
    # name them for a dense one too (PEFT ignores a name that matches nothing).
    known = {name.rsplit(".", 1)[-1] for name in [*targets, *MODULE_ALIASES]} | set(EXPERT_MODULES)
    for target in config.target_modules:
        if str(target).rsplit(".", 1)[-1] not in known:
            raise CheckpointInvalid(f"unknown target module {target!r} (a {cfg.model_type} "
                                    f"model adapts {', '.join(sorted(known))})")


@dataclass(frozen=True)
class _TensorFile:
    """Uniform read access to the adapter's weights file, whatever its format."""

    keys: Callable[[], list[str]]
    shape: Callable[[str], tuple[int, ...]]
    get: Callable[[str], torch.Tensor]


@contextmanager
def _open_weights(adapter_dir: Path, allow_pickle: bool) -> Iterator[_TensorFile]:
    path = adapter_dir / SAFETENSORS_FILE
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as f:
                yield _TensorFile(f.keys, lambda key: tuple(f.get_slice(key).get_shape()), f.get_tensor)
        except (SafetensorError, OSError) as e:
            raise CheckpointInvalid(f"{SAFETENSORS_FILE} is corrupt: {e}") from None
        return
    path = adapter_dir / PICKLE_FILE
    if not path.is_file():
        raise CheckpointInvalid(f"{SAFETENSORS_FILE} is missing")
    if not allow_pickle:
        raise CheckpointInvalid(f"only a pickled {PICKLE_FILE} is present, and pickle files are refused "
                                f"(they can run code); convert it to {SAFETENSORS_FILE}")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a corrupt or hostile file
        raise CheckpointInvalid(f"{PICKLE_FILE} is corrupt: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointInvalid(f"{PICKLE_FILE} does not hold a dict of tensors")
    yield _TensorFile(lambda: list(tensors), lambda key: tuple(tensors[key].shape), tensors.__getitem__)
