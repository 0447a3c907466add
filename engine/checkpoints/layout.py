"""Checkpoints on disk: the `tinker://RUN/KIND/NAME` grammar, the places it may name, and
the files a checkpoint holds besides its adapter.

A checkpoint reaches the disk in one of four forms (docs/checkpoints.md, "How checkpoints
reach the disk"), tried in this order under the checkpoint root:
- written by a trainer: `RUN/KIND/NAME/`;
- downloaded with the service's CLI: `RUN_KIND_NAME/` (the path without its scheme, every
  `/` turned into `_`);
- an archive left packed: `RUN/KIND/NAME.tar`, then `RUN_KIND_NAME.tar`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from engine.checkpoints.errors import CheckpointError

SCHEME = "tinker://"
KINDS = ("sampler_weights", "weights")
ARCHIVE_SUFFIX = ".tar"
COMPLETE_MARKER = "checkpoint_complete"   # written last: without it the job is still writing
CHAT_TEMPLATE = "chat_template.jinja"      # a checkpoint's own chat template, if it ships one


@dataclass(frozen=True)
class TinkerPath:
    run: str
    kind: str     # one of KINDS
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.run}/{self.kind}/{self.name}"

    @property
    def download_name(self) -> str:
        """The service CLI's directory name for it: `RUN_KIND_NAME`."""
        return f"{self.run}_{self.kind}_{self.name}"

    def forms(self) -> list[tuple[PurePosixPath, bool]]:
        """(place under the root, whether it is an archive), in the order they are tried."""
        nested = PurePosixPath(self.run, self.kind, self.name)
        flat = PurePosixPath(self.download_name)
        return [(nested, False), (flat, False),
                (nested.with_name(self.name + ARCHIVE_SUFFIX), True),
                (flat.with_name(self.download_name + ARCHIVE_SUFFIX), True)]


def parse_tinker(name: str) -> TinkerPath:
    """`tinker://RUN/KIND/NAME` -> its parts; CheckpointError for anything else."""
    parts = name.removeprefix(SCHEME).split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(f"`{name}`: a checkpoint path may not have empty, `.` or `..` parts")
    if len(parts) != 3:
        raise CheckpointError(f"`{name}` is not a checkpoint path: expected tinker://RUN/KIND/NAME")
    if parts[1] not in KINDS:
        raise CheckpointError(f"`{name}`: the kind must be one of {', '.join(KINDS)}")
    return TinkerPath(*parts)


def tinker_path_of(rel: PurePosixPath) -> TinkerPath | None:
    """The checkpoint a place under the root holds by its name (the inverse of `forms`),
    None for a plain local name. A download name is split at its last `_sampler_weights_`,
    else its last `_weights_`: run ids hold `:` and `-`, the kinds are fixed words."""
    parts = list(rel.parts)
    if parts and parts[-1].endswith(ARCHIVE_SUFFIX):
        parts[-1] = parts[-1].removesuffix(ARCHIVE_SUFFIX)
    if len(parts) == 3 and parts[1] in KINDS:
        return _valid(TinkerPath(*parts))
    if len(parts) != 1:
        return None
    for kind in KINDS:   # `sampler_weights` first: it ends in `_weights`
        run, sep, name = parts[0].rpartition(f"_{kind}_")
        if sep:
            return _valid(TinkerPath(run, kind, name))
    return None


def _valid(path: TinkerPath) -> TinkerPath | None:
    try:
        return parse_tinker(str(path))
    except CheckpointError:
        return None
