"""Every form a checkpoint reaches the disk in (trainer directory, the service CLI's download,
archives in both places) resolves and is listed by its tinker:// name, once, in order."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path, PurePosixPath

import pytest

import engine.checkpoints.archive as archive_module
from engine.checkpoints.layout import TinkerPath, tinker_path_of
from engine.checkpoints.store import CheckpointError, CheckpointIncomplete
from tests.engine.checkpoints.conftest import STORE_BASE
from tests.engine.checkpoints.helpers import pack_archive, save_peft_adapter

BASE = STORE_BASE   # the base of the `store` fixture
RUN = "0034d8c9-0a88-52a9-b2b7-bce7cb1e6fef:train:0"
NAME = f"tinker://{RUN}/sampler_weights/000080"
FORMS = {"trainer directory": f"{RUN}/sampler_weights/000080",
         "download directory": f"{RUN}_sampler_weights_000080",
         "nested archive": f"{RUN}/sampler_weights/000080.tar",
         "flat archive": f"{RUN}_sampler_weights_000080.tar"}


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> list[Path]:
    """Two complete checkpoints for the base model with different weights."""
    tmp = tmp_path_factory.mktemp("adapters")
    return [save_peft_adapter(tiny_model_dirs[BASE], tmp / f"seed{seed}", r=8, seed=seed)
            for seed in (1, 2)]


def place(adapter: Path, root: Path, rel: str) -> Path:
    """Put the checkpoint `adapter` at root/rel, as a directory or, for `.tar`, an archive."""
    if rel.endswith(".tar"):
        return pack_archive(adapter, root / rel)
    return Path(shutil.copytree(adapter, root / rel))


def weights_bytes(directory: Path) -> bytes:
    return (directory / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("form", FORMS)
def test_each_form_resolves_and_is_listed_by_its_tinker_name(store, adapters, root, cache, form):
    source = place(adapters[0], root, FORMS[form])
    [listed] = store.list()
    assert (listed.name, listed.source) == (NAME, source.resolve())
    assert not cache.exists() or not any(cache.iterdir())   # listing extracts nothing
    info = store.resolve(NAME)
    assert info.source == source.resolve()
    assert weights_bytes(info.path) == weights_bytes(adapters[0])
    assert (info.rank, info.lora_alpha) == (8, 16.0)
    assert info.path == listed.path and info.created == listed.created
    if form.endswith("archive"):
        assert info.path.parent == cache


def test_the_first_form_present_is_the_one_served_and_listed(store, adapters, root):
    place(adapters[1], root, FORMS["flat archive"])
    download = place(adapters[0], root, FORMS["download directory"])
    assert [(i.name, i.source) for i in store.list()] == [(NAME, download.resolve())]
    assert weights_bytes(store.resolve(NAME).path) == weights_bytes(adapters[0])


def test_a_first_form_still_being_written_hides_the_later_ones(store, adapters, root):
    place(adapters[1], root, FORMS["nested archive"])
    (place(adapters[0], root, FORMS["trainer directory"]) / "checkpoint_complete").unlink()
    assert store.list() == []
    with pytest.raises(CheckpointIncomplete, match="checkpoint_complete"):
        store.resolve(NAME)


def test_every_form_of_different_checkpoints_is_listed_each_once(store, adapters, root):
    names = {}
    for step, rel in enumerate(FORMS.values()):
        rel = rel.replace("000080", f"00008{step}")
        place(adapters[step % 2], root, rel)
        names[f"tinker://{RUN}/sampler_weights/00008{step}"] = rel
    listed = [info.name for info in store.list()]
    assert sorted(listed) == sorted(names)
    for name in names:
        assert store.resolve(name).name == name


def test_names_that_are_not_download_names_are_listed_as_plain_paths(store, adapters, root):
    place(adapters[0], root, "notes_weights_")           # no name after the kind
    place(adapters[0], root, "experiments/first.tar")
    assert {info.name for info in store.list()} == {"notes_weights_", "experiments/first.tar"}
    assert store.resolve("experiments/first.tar").source == (root / "experiments/first.tar").resolve()


@pytest.mark.parametrize("directory, expected", [
    (f"{RUN}_sampler_weights_000080", TinkerPath(RUN, "sampler_weights", "000080")),
    ("abc:train:0_weights_final", TinkerPath("abc:train:0", "weights", "final")),
    ("run_weights_x_sampler_weights_y", TinkerPath("run_weights_x", "sampler_weights", "y")),
    ("abc_sampler_weights_my_step.tar", TinkerPath("abc", "sampler_weights", "my_step")),
    ("plain-directory", None),
    ("abc_weights_", None),
    ("_sampler_weights_000080", None),
])
def test_download_names_split_at_the_last_kind(directory, expected):
    assert tinker_path_of(PurePosixPath(directory)) == expected


def test_a_replaced_archive_is_extracted_again(store, adapters, root):
    archive = place(adapters[0], root, FORMS["nested archive"])
    first = store.resolve(NAME).path
    pack_archive(adapters[1], archive)
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    second = store.resolve(NAME).path
    assert second != first and not first.exists()   # the old version's copy is removed
    assert weights_bytes(second) == weights_bytes(adapters[1])
    assert store.resolve(NAME).path == second       # and not extracted a third time


def test_concurrent_first_uses_of_an_archive_build_one_copy(store, adapters, root, cache,
                                                            monkeypatch):
    place(adapters[0], root, FORMS["flat archive"])
    both_writing = threading.Barrier(2, timeout=30)
    write_files = archive_module._write_files

    def slow_write(checked, dest, name):
        write_files(checked, dest, name)
        both_writing.wait()   # each has written its own copy before either renames it

    monkeypatch.setattr(archive_module, "_write_files", slow_write)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.resolve(NAME).path))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert weights_bytes(results[0]) == weights_bytes(adapters[0])
    assert sorted(cache.iterdir()) == [results[0]]   # no temporary copy left behind


@pytest.mark.parametrize("form", FORMS)
def test_a_form_symlinked_from_outside_the_root_is_refused(store, adapters, root, tmp_path, form):
    outside = place(adapters[0], tmp_path, "elsewhere" + (".tar" if form.endswith("archive") else ""))
    (root / FORMS[form]).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / FORMS[form])
    with pytest.raises(CheckpointError, match="leads outside the checkpoint root"):
        store.resolve(NAME)
    assert store.list() == []
