"""The checkpoint store: from the name a user gives to a servable LoRA checkpoint.

Names accepted (see docs/checkpoints.md):
- `tinker://RUN/KIND/NAME`, KIND `sampler_weights` or `weights`, in whichever form it
  reached the disk (engine.checkpoints.layout): `<root>/RUN/KIND/NAME/`, the service CLI's
  download `<root>/RUN_KIND_NAME/`, or an archive `<root>/RUN/KIND/NAME.tar` or
  `<root>/RUN_KIND_NAME.tar`, extracted on first use into a cache (engine.checkpoints.archive);
- a directory or `.tar` path, absolute or relative to the root;
- the base model's own name, which means the base model (`resolve` returns None).

No name may lead outside the root: `..` parts, NUL, empty parts, and absolute paths or
symlinks that end elsewhere are refused. A checkpoint is servable only once the training
job has written its `checkpoint_complete` marker (it writes the weights first), and
only if its adapter fits the served base model. Nothing but extracted archives is cached:
every call looks at the disk afresh, so a checkpoint saved a second ago is listed and
servable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.checkpoints.adapter import PICKLE_FILE, SAFETENSORS_FILE, inspect_adapter
from engine.checkpoints.adapter_config import CONFIG_FILE, AdapterConfig
from engine.checkpoints.archive import ArchiveCache, open_archive
from engine.checkpoints.errors import (
    CheckpointError,
    CheckpointIncomplete,
    CheckpointInvalid,
    CheckpointNotFound,
)
from engine.checkpoints.layout import (
    ARCHIVE_SUFFIX,
    CHAT_TEMPLATE,
    COMPLETE_MARKER,
    SCHEME,
    parse_tinker,
    tinker_path_of,
)
from engine.config import ModelConfig
from engine.models.default_model import pokeserve_home

__all__ = ["CheckpointStore", "CheckpointInfo", "CheckpointError", "CheckpointNotFound",
           "CheckpointIncomplete", "CheckpointInvalid"]

MAX_LIST_DEPTH = 3         # RUN/KIND/NAME: listing looks no deeper
MAX_CONFIG_BYTES = 1 << 20  # an archived adapter_config.json is read whole when listing


@dataclass(frozen=True)
class CheckpointInfo:
    name: str                    # canonical name: `tinker://RUN/KIND/NAME`, else the path under the root
    path: Path                   # the directory served (pass it to LoraManager.activate); for an
                                 # archive its extracted copy (listing gives where it will be)
    source: Path                 # what lies under the root: the directory or the archive
    base_model: str              # what the adapter says it was trained on (else the served model)
    rank: int                    # the adapter's default `r`
    lora_alpha: float
    created: float               # Unix time its `checkpoint_complete` marker was written
    chat_template: Path | None   # its own `chat_template.jinja`, if it ships one


@dataclass(frozen=True)
class _Found:
    path: Path       # resolved, inside the root
    archive: bool


class CheckpointStore:
    """Thread-safe: it holds no mutable state (the archive cache is safe to share)."""

    def __init__(self, root: str | Path | None, base_model_name: str, model_cfg: ModelConfig,
                 allow_pickle: bool = False, cache_dir: str | Path | None = None,
                 max_lora_rank: int | None = None) -> None:
        """`cache_dir` holds extracted archives (default: $POKESERVE_HOME/checkpoint-cache);
        adapters of a rank above `max_lora_rank` are refused (CheckpointInvalid)."""
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.base_model_name = base_model_name
        self.model_cfg = model_cfg
        self.allow_pickle = allow_pickle
        self.max_lora_rank = max_lora_rank
        self.archives = ArchiveCache(Path(cache_dir or pokeserve_home() / "checkpoint-cache"))

    def resolve(self, name: str) -> CheckpointInfo | None:
        """The servable checkpoint `name` means (None: the base model).

        Raises CheckpointError (bad name), CheckpointNotFound, CheckpointIncomplete or
        CheckpointInvalid, each with a message meant for the user. The first use of an
        archive extracts it (the only slow case).
        """
        if name == self.base_model_name:
            return None
        found = self._find(name)
        try:
            path = self._directory(name, found)
            config = inspect_adapter(path, self.model_cfg, self.allow_pickle, self.max_lora_rank)
            return self._info(name, path, found.path, config, *_dir_facts(name, path))
        except CheckpointInvalid as e:
            raise CheckpointInvalid(f"Checkpoint `{name}` cannot be served: {e}") from None

    def list(self) -> list[CheckpointInfo]:
        """Every complete checkpoint under the root made for the served base model, oldest
        first, each once under the name that resolves to it.

        Cheap: reads each `adapter_config.json` and archive headers, not the tensors
        (`resolve` checks those), and extracts nothing.
        """
        if self.root is None or not self.root.is_dir():
            return []
        found = [info for rel, archive in self._places() if (info := self._listed(rel, archive))]
        return sorted(found, key=lambda info: (info.created, info.name))

    def _find(self, name: str) -> _Found:
        """The first form of `name` present under the root."""
        if not name.strip():
            raise CheckpointError("the model name is empty")
        if "\0" in name:
            raise CheckpointError("the model name contains a NUL character")
        if self.root is None:
            raise CheckpointNotFound(name, "no checkpoint root is configured")
        if name.startswith(SCHEME):
            forms = parse_tinker(name).forms()
        else:
            if ".." in Path(name).parts:
                raise CheckpointError(f"`{name}`: a checkpoint path may not contain `..`")
            forms = [(Path(name), False), (Path(name), True)]
        for rel, archive in forms:
            path = self._confined(name, self.root / rel)   # an absolute `rel` replaces the root
            if (path.is_file() and path.suffix == ARCHIVE_SUFFIX) if archive else path.is_dir():
                return _Found(path, archive)
        raise CheckpointNotFound(name)

    def _confined(self, name: str, path: Path) -> Path:
        try:
            resolved = path.resolve()   # follows symlinks, so their targets are checked too
            resolved.exists()   # False if missing; a name too long for the filesystem raises
        except (OSError, RuntimeError):
            raise CheckpointNotFound(name) from None
        if resolved == self.root:
            raise CheckpointNotFound(name)
        self._check_inside(name, resolved)
        return resolved

    def _check_inside(self, name: str, path: Path) -> None:
        if path.exists() and not path.resolve().is_relative_to(self.root):
            raise CheckpointError(f"`{name}` leads outside the checkpoint root")

    def _directory(self, name: str, found: _Found) -> Path:
        """The directory to serve `found` from: itself, or its archive's extracted copy."""
        if found.archive:
            try:
                return self.archives.extract(found.path, name)
            except FileNotFoundError:   # deleted since it was found
                raise CheckpointNotFound(name) from None
            except OSError as e:
                raise CheckpointInvalid(f"its archive cannot be read: {e}") from None
        if not (found.path / COMPLETE_MARKER).is_file():
            raise CheckpointIncomplete(name)
        for file in (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE):
            self._check_inside(name, found.path / file)
        return found.path

    def _check_base_model(self, config: AdapterConfig) -> None:
        # Hub ids and paths both end in the model's name: `HuggingFaceTB/SmolLM2-135M-Instruct`.
        declared = config.base_model
        if declared and Path(declared.rstrip("/")).name.lower() != self.base_model_name.lower():
            raise CheckpointInvalid(f"it was trained on `{declared}`, but this server serves "
                                    f"`{self.base_model_name}`")

    def _places(self) -> Iterator[tuple[PurePosixPath, bool]]:
        """(path under the root, whether an archive) of everything that may be a checkpoint."""
        for dirpath, dirnames, filenames in os.walk(self.root):   # does not follow symlinks
            rel = PurePosixPath(Path(dirpath).relative_to(self.root))
            if COMPLETE_MARKER in filenames and CONFIG_FILE in filenames:
                dirnames.clear()
                yield rel, False
                continue
            yield from ((rel / file, True) for file in filenames if file.endswith(ARCHIVE_SUFFIX))
            if len(rel.parts) >= MAX_LIST_DEPTH:
                dirnames.clear()

    def _listed(self, rel: PurePosixPath, archive: bool) -> CheckpointInfo | None:
        tinker = tinker_path_of(rel)
        name = str(tinker) if tinker else str(rel)
        try:
            found = self._find(name)
            if found != _Found((self.root / rel).resolve(), archive):
                return None   # another form of the name comes first: it is the one served
            return self._peek_archive(name, found) if archive else self._peek_dir(name, found)
        except (CheckpointError, OSError):
            return None   # not servable (now); `resolve` explains why to whoever names it

    def _peek_dir(self, name: str, found: _Found) -> CheckpointInfo:
        if not any((found.path / file).is_file() for file in self._weight_files):
            raise CheckpointInvalid("no weights file")
        return self._info(name, found.path, found.path, AdapterConfig.from_dir(found.path),
                          *_dir_facts(name, found.path))

    def _peek_archive(self, name: str, found: _Found) -> CheckpointInfo:
        with open_archive(found.path, name) as checked:
            if not any(file in checked.files for file in self._weight_files):
                raise CheckpointInvalid("no weights file")
            config = AdapterConfig.from_json(checked.read(CONFIG_FILE, MAX_CONFIG_BYTES))
            path = self.archives.version_dir(found.path, checked.stat)
            template = path / CHAT_TEMPLATE if CHAT_TEMPLATE in checked.files else None
            return self._info(name, path, found.path, config,
                              checked.files[COMPLETE_MARKER].mtime, template)

    @property
    def _weight_files(self) -> tuple[str, ...]:
        return (SAFETENSORS_FILE, PICKLE_FILE) if self.allow_pickle else (SAFETENSORS_FILE,)

    def _info(self, name: str, path: Path, source: Path, config: AdapterConfig, created: float,
              chat_template: Path | None) -> CheckpointInfo:
        self._check_base_model(config)
        return CheckpointInfo(
            name=name, path=path, source=source, base_model=config.base_model or self.base_model_name,
            rank=config.r, lora_alpha=config.lora_alpha, created=created, chat_template=chat_template)


def _dir_facts(name: str, path: Path) -> tuple[float, Path | None]:
    """(when its `checkpoint_complete` was written, its own chat template) of a directory."""
    try:
        created = (path / COMPLETE_MARKER).stat().st_mtime
    except FileNotFoundError:
        raise CheckpointIncomplete(name) from None   # the training job is rewriting it
    template = path / CHAT_TEMPLATE
    return created, template if template.is_file() else None
