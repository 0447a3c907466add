"""Checkpoint archives: the service's one uncompressed `.tar`, extracted on first use.

The cache keeps one directory per archive version, named from the archive's resolved
path, size and modification time: a replaced archive is a new version, extracted afresh,
and the older versions of it are deleted then. Extraction writes into a temporary
directory renamed into place last, so a version's directory exists only when complete;
two requests extracting one archive at once each build their own and one rename wins.

Archives come from elsewhere, so every member is checked before anything is written.
Refused (CheckpointInvalid): a member whose path is absolute or leaves the archive, a
link, device, FIFO or sparse file, a path given twice, more than MAX_MEMBERS members, more
than MAX_UNPACKED_BYTES in all. Files are then written by this module alone, not by
`extractall`: plain files with our permissions, created exclusively inside the fresh
temporary directory (tarfile's `data` filter would refuse the same members, but these
rules are ours to state and to test). An archive cut short, one still being written, or
one without `checkpoint_complete` is CheckpointIncomplete, as a directory without it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from engine.checkpoints.errors import CheckpointIncomplete, CheckpointInvalid
from engine.checkpoints.layout import COMPLETE_MARKER

MAX_MEMBERS = 64                 # the service's archive holds 3 files (4 with a chat template)
MAX_UNPACKED_BYTES = 64 << 30    # above any adapter of the service's lineup (rank 32)
PROGRESS_MIN_BYTES = 256 << 20   # archives this large show a progress bar
_CHUNK = 1 << 20
_CUT_SHORT = "its archive is cut short"


@dataclass(frozen=True)
class CheckedArchive:
    """An open archive that passed every check, and what it holds."""

    tar: tarfile.TarFile
    files: dict[str, tarfile.TarInfo]   # regular files by path inside: `adapter_config.json`
    dirs: list[str]
    stat: os.stat_result                # of the archive file when it was opened

    def read(self, file: str, limit: int) -> bytes:
        """A small file's bytes (CheckpointInvalid if missing or past `limit`)."""
        member = self.files.get(file)
        if member is None:
            raise CheckpointInvalid(f"{file} is missing from the archive")
        if member.size > limit:
            raise CheckpointInvalid(f"{file} in the archive is larger than {limit} bytes")
        return self.tar.extractfile(member).read()

    def changed(self) -> bool:
        now = os.fstat(self.tar.fileobj.fileno())
        return (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns)


@contextmanager
def open_archive(path: Path, name: str) -> Iterator[CheckedArchive]:
    """Open and check the archive of checkpoint `name` (headers only: no data is read)."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:
            if stat.st_size < tarfile.BLOCKSIZE:   # not even one header written yet
                raise CheckpointIncomplete(name, _CUT_SHORT) from None
            raise CheckpointInvalid("it is not an uncompressed tar archive") from None
        with tar:
            members = _read_members(tar, name)
            if not _ends_complete(f, tar.offset):
                raise CheckpointIncomplete(name, _CUT_SHORT)
            files, dirs = _check_members(members)
            if COMPLETE_MARKER not in files:
                raise CheckpointIncomplete(name, f"its archive holds no `{COMPLETE_MARKER}`")
            yield CheckedArchive(tar, files, dirs, stat)


def _read_members(tar: tarfile.TarFile, name: str) -> list[tarfile.TarInfo]:
    members = []
    try:
        for member in tar:   # reads each header and seeks over the data
            members.append(member)
            if len(members) > MAX_MEMBERS:
                raise CheckpointInvalid(f"its archive has more than {MAX_MEMBERS} members")
    except tarfile.ReadError:   # "unexpected end of data": a member's data is cut short
        raise CheckpointIncomplete(name, _CUT_SHORT) from None
    return members


def _ends_complete(f, offset: int) -> bool:
    # tarfile takes a header cut short, or garbage, for the end of the archive. A complete
    # one has its end marker, zero blocks, where the next header would be (`offset`); the
    # standard asks for two, but one already says that no member follows.
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _check_members(members: list[tarfile.TarInfo]) -> tuple[dict[str, tarfile.TarInfo], list[str]]:
    files, dirs, total = {}, [], 0
    for member in members:
        path = _inner_path(member.name)
        if not (member.isdir() or (member.isreg() and not member.issparse())):
            raise CheckpointInvalid(f"archive member `{member.name}` is a {_type_name(member)}; "
                                    "only plain files and directories are extracted")
        if path in files or path in dirs:
            raise CheckpointInvalid(f"archive member `{member.name}` is given twice")
        if member.isdir():
            dirs.append(path)
            continue
        files[path] = member
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise CheckpointInvalid(f"its archive unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    return files, dirs


def _inner_path(member_name: str) -> str:
    path = PurePosixPath(member_name)
    if path.is_absolute():
        raise CheckpointInvalid(f"archive member `{member_name}` has an absolute path")
    if ".." in path.parts:
        raise CheckpointInvalid(f"archive member `{member_name}` leaves the archive's directory")
    return "/".join(path.parts)   # `./a//b` -> `a/b`; the top directory itself -> ``


def _type_name(member: tarfile.TarInfo) -> str:
    for test, name in ((member.issym, "symbolic link"), (member.islnk, "hard link"),
                       (member.ischr, "character device"), (member.isblk, "block device"),
                       (member.isfifo, "FIFO"), (member.issparse, "sparse file")):
        if test():
            return name
    return f"member of tar type {member.type!r}"


class ArchiveCache:
    """Extracted archives under `root`, one directory per archive version."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def version_dir(self, archive: Path, stat: os.stat_result | None = None) -> Path:
        """Where this version of `archive` (a resolved path) is, or will be, extracted."""
        stat = stat or archive.stat()
        return self.root / f"{_digest(str(archive))}-{_digest(f'{stat.st_size}:{stat.st_mtime_ns}')}"

    def extract(self, archive: Path, name: str) -> Path:
        """The directory holding the files of `archive`, checkpoint `name`'s, extracted
        on first use. Raises CheckpointIncomplete or CheckpointInvalid."""
        target = self.version_dir(archive)
        if target.is_dir():
            return target
        with open_archive(archive, name) as checked:
            target = self.version_dir(archive, checked.stat)
            if not target.is_dir():
                self._build(checked, target, name)
        for old in self.root.glob(f"{_digest(str(archive))}-*"):
            if old != target:   # a version replaced on disk; in flight requests fail cleanly
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _build(self, checked: CheckedArchive, target: Path, name: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".extract-"))
        try:
            _write_files(checked, tmp, name)
            if checked.changed():
                raise CheckpointIncomplete(name, "its archive changed while it was extracted")
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():   # not another extraction that finished first
                    raise
        except tarfile.ReadError:   # the archive shrank since it was checked
            raise CheckpointIncomplete(name, _CUT_SHORT) from None
        except OSError as e:
            raise CheckpointInvalid(f"its archive cannot be extracted: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_files(checked: CheckedArchive, dest: Path, name: str) -> None:
    total = sum(member.size for member in checked.files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {name}",
              disable=total < PROGRESS_MIN_BYTES) as bar:
        for path in checked.dirs:
            (dest / path).mkdir(parents=True, exist_ok=True)
        for path, member in checked.files.items():
            out = dest / path
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with checked.tar.extractfile(member) as src, open(fd, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
            os.utime(out, (member.mtime, member.mtime))   # `created` is when the job wrote it


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
