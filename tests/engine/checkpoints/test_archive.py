"""Archives from elsewhere: unsafe ones are refused naming the checkpoint, with nothing
written outside the cache (nor in it); cut-short or unmarked ones are still being written."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import engine.checkpoints.archive as archive_module
from engine.checkpoints.store import (
    CheckpointIncomplete,
    CheckpointInvalid,
)
from tests.engine.checkpoints.conftest import STORE_BASE
from tests.engine.checkpoints.helpers import pack_archive, save_peft_adapter

BASE = STORE_BASE   # the base of the `store` fixture
NAME = "tinker://run:train:0/sampler_weights/000010"
REL = "run:train:0/sampler_weights/000010.tar"


@pytest.fixture(scope="module")
def adapter(tiny_model_dirs, tmp_path_factory) -> Path:
    return save_peft_adapter(tiny_model_dirs[BASE], tmp_path_factory.mktemp("adapter") / "a", r=4)


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tree(top: Path) -> dict[str, bytes | None]:
    """Every path under `top` with its bytes (None for a directory or a link)."""
    return {str(p.relative_to(top)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(top.rglob("*"))}


def unsafe_members(tmp_path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None, str]]:
    """case -> (member, its data, the refusal's message)."""
    escape = tmp_path / "escaped"
    return {
        "absolute path": (member(str(escape)), b"x", "has an absolute path"),
        "parent path": (member("../escaped"), b"x", "leaves the archive's directory"),
        "parent path inside": (member("sub/../../escaped"), b"x", "leaves the archive's directory"),
        "symbolic link": (member("link", tarfile.SYMTYPE, linkname=str(escape)), None,
                          "is a symbolic link"),
        "hard link": (member("adapter_model.safetensors2", tarfile.LNKTYPE,
                             linkname="../escaped"), None, "is a hard link"),
        "character device": (member("tty", tarfile.CHRTYPE, devmajor=5, devminor=0), None,
                             "is a character device"),
        "block device": (member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), None,
                         "is a block device"),
        "FIFO": (member("pipe", tarfile.FIFOTYPE), None, "is a FIFO"),
        "duplicate": (member("adapter_config.json"), b"{}", "is given twice"),
    }


@pytest.mark.parametrize("case", list(unsafe_members(Path("/x"))))
def test_unsafe_archives_are_refused_with_nothing_written(store, adapter, tmp_path, case):
    info, data, message = unsafe_members(tmp_path)[case]
    pack_archive(adapter, store.root / REL, extra=[(info, data)])
    before = tree(tmp_path)
    with pytest.raises(CheckpointInvalid, match=f"Checkpoint `{NAME}` cannot be served: .*{message}"):
        store.resolve(NAME)
    assert tree(tmp_path) == before   # the cache too: not even its directory was made
    assert store.list() == []


@pytest.mark.parametrize("limit, message", [
    ("MAX_MEMBERS", "its archive has more than 4 members"),
    ("MAX_UNPACKED_BYTES", "its archive unpacks to more than 4 bytes"),
])
def test_archives_past_the_bounds_are_refused(store, adapter, tmp_path, monkeypatch, limit, message):
    monkeypatch.setattr(archive_module, limit, 4)
    extra = [(member(f"notes/{i}.txt"), b"data") for i in range(2)]
    pack_archive(adapter, store.root / REL, extra=extra)
    before = tree(tmp_path)
    with pytest.raises(CheckpointInvalid, match=f"`{NAME}` cannot be served: {message}"):
        store.resolve(NAME)
    assert tree(tmp_path) == before


def test_an_archive_at_the_bounds_is_served(store, adapter, monkeypatch):
    archive = pack_archive(adapter, store.root / REL)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", len(members))
    monkeypatch.setattr(archive_module, "MAX_UNPACKED_BYTES", sum(m.size for m in members))
    assert (store.resolve(NAME).path / "adapter_model.safetensors").is_file()


def cut_points(archive: Path) -> dict[str, int]:
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    data_end = last.offset_data + -(-last.size // 512) * 512
    return {"empty": 0, "inside the first header": 100, "inside the data": data_end - 700,
            "before the end marker": data_end, "inside the end marker": data_end + 256}


@pytest.mark.parametrize("cut", ["empty", "inside the first header", "inside the data",
                                 "before the end marker", "inside the end marker"])
def test_an_archive_cut_short_is_still_being_written(store, adapter, tmp_path, cut):
    archive = pack_archive(adapter, store.root / REL)
    whole = archive.read_bytes()
    archive.write_bytes(whole[:cut_points(archive)[cut]])
    with pytest.raises(CheckpointIncomplete, match=f"`{NAME}` is still being written "
                                                   r"\(its archive is cut short\)"):
        store.resolve(NAME)
    assert store.list() == []
    assert not (tmp_path / "cache").exists()
    archive.write_bytes(whole)   # the writer finishes: now it is served
    assert [info.name for info in store.list()] == [NAME]
    assert (store.resolve(NAME).path / "checkpoint_complete").is_file()


def test_an_archive_without_its_complete_marker_is_still_being_written(store, adapter, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (staged / file).write_bytes((adapter / file).read_bytes())
    pack_archive(staged, store.root / REL)
    with pytest.raises(CheckpointIncomplete, match="holds no `checkpoint_complete`"):
        store.resolve(NAME)
    assert store.list() == []


def test_a_file_that_is_not_a_tar_archive_is_refused(store):
    (store.root / REL).parent.mkdir(parents=True)
    (store.root / REL).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointInvalid, match="is not an uncompressed tar archive"):
        store.resolve(NAME)


def test_an_archive_ended_by_one_zero_block_is_complete(store, adapter):
    # The standard asks for two; some writers stop at one, and no member can follow it.
    archive = pack_archive(adapter, store.root / REL)
    archive.write_bytes(archive.read_bytes()[:cut_points(archive)["before the end marker"] + 512])
    assert (store.resolve(NAME).path / "adapter_model.safetensors").is_file()
