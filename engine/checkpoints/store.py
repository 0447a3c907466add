"""The checkpoint store: from the name a user gives to a servable LoRA checkpoint.

Names accepted (see docs/checkpoints.md):
- `tinker://RUN/KIND/NAME` -> `<root>/RUN/KIND/NAME/`, KIND `sampler_weights` or `weights`;
- a directory path, absolute or relative to the root;
- the base model's own name, which means the base model (`resolve` returns None).

No name may lead outside the root: `..` parts, NUL, empty parts, and absolute paths or
symlinks that end elsewhere are refused. A directory is servable only once the training
job has written its `checkpoint_complete` marker (it writes the weights first), and
only if its adapter fits the served base model. Nothing is cached: every call looks at
the disk afresh, so a checkpoint saved a second ago is listed and servable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoints.adapter import PICKLE_FILE, SAFETENSORS_FILE, inspect_adapter
from engine.checkpoints.adapter_config import CONFIG_FILE, AdapterConfig
from engine.checkpoints.errors import (
    CheckpointError,
    CheckpointIncomplete,
    CheckpointInvalid,
    CheckpointNotFound,
)
from engine.config import ModelConfig

__all__ = ["CheckpointStore", "CheckpointInfo", "CheckpointError", "CheckpointNotFound",
           "CheckpointIncomplete", "CheckpointInvalid"]

SCHEME = "tinker://"
KINDS = ("sampler_weights", "weights")
COMPLETE_MARKER = "checkpoint_complete"
CHAT_TEMPLATE = "chat_template.jinja"
MAX_LIST_DEPTH = 3   # RUN/KIND/NAME: listing looks no deeper


@dataclass(frozen=True)
class CheckpointInfo:
    name: str                    # canonical name: `tinker://RUN/KIND/NAME`, else the path under the root
    path: Path                   # the resolved directory (pass it to LoraManager.activate)
    base_model: str              # what the adapter says it was trained on (else the served model)
    rank: int                    # the adapter's default `r`
    lora_alpha: float
    created: float               # Unix time its `checkpoint_complete` marker was written
    chat_template: Path | None   # its own `chat_template.jinja`, if it ships one


class CheckpointStore:
    """Thread-safe: it holds no mutable state."""

    def __init__(self, root: str | Path | None, base_model_name: str, model_cfg: ModelConfig,
                 allow_pickle: bool = False, max_lora_rank: int | None = None) -> None:
        """`max_lora_rank`: adapters of a higher rank are refused (CheckpointInvalid)."""
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.base_model_name = base_model_name
        self.model_cfg = model_cfg
        self.allow_pickle = allow_pickle
        self.max_lora_rank = max_lora_rank

    def resolve(self, name: str) -> CheckpointInfo | None:
        """The servable checkpoint `name` means (None: the base model).

        Raises CheckpointError (bad name), CheckpointNotFound, CheckpointIncomplete or
        CheckpointInvalid, each with a message meant for the user.
        """
        if name == self.base_model_name:
            return None
        path = self._locate(name)
        if not path.is_dir():
            raise CheckpointNotFound(name)
        if not (path / COMPLETE_MARKER).is_file():
            raise CheckpointIncomplete(name)
        for file in (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE):
            self._check_inside(name, path / file)
        try:
            config = inspect_adapter(path, self.model_cfg, self.allow_pickle, self.max_lora_rank)
            self._check_base_model(config)
        except CheckpointInvalid as e:
            raise CheckpointInvalid(f"Checkpoint `{name}` cannot be served: {e}") from None
        return self._info(name, path, config)

    def list(self) -> list[CheckpointInfo]:
        """Every complete checkpoint under the root made for the served base model, oldest first.

        Cheap: reads each `adapter_config.json`, not the tensors (`resolve` checks those).
        """
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):   # does not follow symlinks
            rel = Path(dirpath).relative_to(self.root)
            if COMPLETE_MARKER in filenames and CONFIG_FILE in filenames:
                dirnames.clear()
                info = self._listed(rel)
                if info is not None:
                    found.append(info)
            elif len(rel.parts) >= MAX_LIST_DEPTH:
                dirnames.clear()
        return sorted(found, key=lambda info: (info.created, info.name))

    def _locate(self, name: str) -> Path:
        if not name.strip():
            raise CheckpointError("the model name is empty")
        if "\0" in name:
            raise CheckpointError("the model name contains a NUL character")
        if self.root is None:
            raise CheckpointNotFound(name, "no checkpoint root is configured")
        if name.startswith(SCHEME):
            parts = name[len(SCHEME):].split("/")
            if any(part in ("", ".", "..") for part in parts):
                raise CheckpointError(f"`{name}`: a checkpoint path may not have empty, `.` or `..` parts")
            if len(parts) != 3:
                raise CheckpointError(f"`{name}` is not a checkpoint path: expected tinker://RUN/KIND/NAME")
            if parts[1] not in KINDS:
                raise CheckpointError(f"`{name}`: the kind must be one of {', '.join(KINDS)}")
            path = self.root.joinpath(*parts)
        else:
            if ".." in Path(name).parts:
                raise CheckpointError(f"`{name}`: a checkpoint path may not contain `..`")
            path = self.root / name   # an absolute `name` replaces the root
        try:
            resolved = path.resolve()   # follows symlinks, so their targets are checked too
            resolved.stat()   # a name too long for the filesystem fails here, not later
        except (OSError, RuntimeError):
            raise CheckpointNotFound(name) from None
        if resolved == self.root:
            raise CheckpointNotFound(name)
        self._check_inside(name, resolved)
        return resolved

    def _check_inside(self, name: str, path: Path) -> None:
        if path.exists() and not path.resolve().is_relative_to(self.root):
            raise CheckpointError(f"`{name}` leads outside the checkpoint root")

    def _check_base_model(self, config: AdapterConfig) -> None:
        # Hub ids and paths both end in the model's name: `HuggingFaceTB/SmolLM2-135M-Instruct`.
        declared = config.base_model
        if declared and Path(declared.rstrip("/")).name.lower() != self.base_model_name.lower():
            raise CheckpointInvalid(f"it was trained on `{declared}`, but this server serves "
                                    f"`{self.base_model_name}`")

    def _listed(self, rel: Path) -> CheckpointInfo | None:
        path = self.root / rel
        weights = (SAFETENSORS_FILE, PICKLE_FILE) if self.allow_pickle else (SAFETENSORS_FILE,)
        if not any((path / file).is_file() for file in weights):
            return None
        parts = rel.parts
        name = SCHEME + "/".join(parts) if len(parts) == 3 and parts[1] in KINDS else str(rel)
        try:
            config = AdapterConfig.from_dir(path)
            self._check_base_model(config)
            return self._info(name, path, config)
        except CheckpointError:
            return None   # not servable (now); `resolve` explains why to whoever names it

    def _info(self, name: str, path: Path, config: AdapterConfig) -> CheckpointInfo:
        try:
            created = (path / COMPLETE_MARKER).stat().st_mtime
        except FileNotFoundError:
            raise CheckpointIncomplete(name) from None   # the training job is rewriting it
        template = path / CHAT_TEMPLATE
        return CheckpointInfo(
            name=name, path=path, base_model=config.base_model or self.base_model_name,
            rank=config.r, lora_alpha=config.lora_alpha, created=created,
            chat_template=template if template.is_file() else None)
