"""The checkpoint store: names to directories, refusals with clear errors, live listing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.checkpoints.store import (
    CheckpointError,
    CheckpointIncomplete,
    CheckpointInvalid,
    CheckpointNotFound,
    CheckpointStore,
)
from engine.models.registry import load_model_config
from tests.engine.checkpoints.conftest import STORE_BASE
from tests.engine.checkpoints.helpers import save_peft_adapter

BASE = STORE_BASE   # the base of the `store` fixture
RUN = "0034d8c9-0a88-52a9-b2b7-bce7cb1e6fef:train:0"


@pytest.fixture(scope="module")
def adapter_template(tiny_model_dirs, tmp_path_factory) -> Path:
    """One complete PEFT checkpoint for the base model, copied wherever a test needs one."""
    return save_peft_adapter(tiny_model_dirs[BASE], tmp_path_factory.mktemp("template") / "ckpt", r=8)


@pytest.fixture
def place(adapter_template, root):
    """place(rel, complete=True) copies the template checkpoint to root/rel."""
    def place(rel: str, complete: bool = True) -> Path:
        dest = root / rel
        shutil.copytree(adapter_template, dest)
        if not complete:
            (dest / "checkpoint_complete").unlink()
        return dest
    return place


def edit_config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_tinker_path_resolves_to_its_directory_under_the_root(store, place):
    path = place(f"{RUN}/sampler_weights/000080")
    info = store.resolve(f"tinker://{RUN}/sampler_weights/000080")
    assert info.path == path.resolve()
    assert (info.rank, info.lora_alpha) == (8, 16.0)
    assert Path(info.base_model).name == BASE


def test_plain_paths_inside_the_root_resolve(store, place, root):
    path = place("experiments/final")
    assert store.resolve("experiments/final").path == path.resolve()
    assert store.resolve(str(root / "experiments" / "final")).path == path.resolve()


def test_the_base_models_own_name_means_the_base_model(store):
    assert store.resolve(BASE) is None


@pytest.mark.parametrize("name, message", [
    ("tinker://../sampler_weights/x", r"empty, `\.` or `\.\.` parts"),
    (f"tinker://{RUN}/sampler_weights/..", r"empty, `\.` or `\.\.` parts"),
    (f"tinker://{RUN}//000080", r"empty, `\.` or `\.\.` parts"),
    (f"tinker://{RUN}/sampler_weights/../../etc", r"empty, `\.` or `\.\.` parts"),
    (f"tinker://{RUN}/sampler_weights/", r"empty, `\.` or `\.\.` parts"),
    (f"tinker://{RUN}/sampler_weights/000080/extra", "expected tinker://RUN/KIND/NAME"),
    (f"tinker://{RUN}/optimizer/000080", "the kind must be one of"),
    ("../outside", "may not contain `..`"),
    ("run/../../outside", "may not contain `..`"),
    ("/etc", "leads outside the checkpoint root"),
    ("run\0/x", "NUL character"),
    ("", "the model name is empty"),
])
def test_names_that_could_leave_the_root_are_refused(store, name, message):
    with pytest.raises(CheckpointError, match=message):
        store.resolve(name)


def test_a_symlink_leading_out_of_the_root_is_refused(store, adapter_template, root):
    (root / RUN / "sampler_weights").mkdir(parents=True)
    os.symlink(adapter_template, root / RUN / "sampler_weights" / "000080")
    with pytest.raises(CheckpointError, match="leads outside the checkpoint root"):
        store.resolve(f"tinker://{RUN}/sampler_weights/000080")


def test_a_symlinked_weights_file_leading_out_is_refused(store, place, adapter_template):
    path = place("run/sampler_weights/000010")
    (path / "adapter_model.safetensors").unlink()
    os.symlink(adapter_template / "adapter_model.safetensors", path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="leads outside the checkpoint root"):
        store.resolve("tinker://run/sampler_weights/000010")


def test_a_missing_checkpoint_does_not_exist(store):
    name = f"tinker://{RUN}/sampler_weights/000999"
    with pytest.raises(CheckpointNotFound) as err:
        store.resolve(name)
    assert str(err.value) == f"The model `{name}` does not exist."


def test_without_a_root_only_the_base_model_exists(tiny_model_dirs):
    store = CheckpointStore(None, BASE, load_model_config(tiny_model_dirs[BASE]))
    assert store.resolve(BASE) is None
    with pytest.raises(CheckpointNotFound, match="no checkpoint root is configured"):
        store.resolve("tinker://run/sampler_weights/1")
    assert store.list() == []


def test_a_checkpoint_without_its_complete_marker_is_still_being_written(store, place):
    place("run/sampler_weights/000020", complete=False)
    with pytest.raises(CheckpointIncomplete, match="is still being written"):
        store.resolve("tinker://run/sampler_weights/000020")


def test_a_corrupt_checkpoint_is_refused_naming_it_and_the_problem(store, place):
    path = place("run/sampler_weights/000030")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointInvalid,
                       match=r"`tinker://run/sampler_weights/000030` cannot be served: .*corrupt"):
        store.resolve("tinker://run/sampler_weights/000030")


def test_a_checkpoint_for_another_base_model_is_refused(store, place):
    edit_config(place("run/sampler_weights/000040"), base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with pytest.raises(CheckpointInvalid, match=f"trained on `meta-llama/Llama-3.2-1B`, but this "
                                                f"server serves `{BASE}`"):
        store.resolve("tinker://run/sampler_weights/000040")


def test_a_checkpoint_whose_shapes_do_not_fit_the_base_model_is_refused(store, root, tiny_model_dirs):
    other = save_peft_adapter(tiny_model_dirs["qwen3-qk-norm-tied"], root / "run/sampler_weights/000050")
    edit_config(other, base_model_name_or_path=BASE)
    with pytest.raises(CheckpointInvalid,
                       match=r"_proj: lora_A \[8, \d+\] / lora_B \[\d+, 8\] do not fit this base model"):
        store.resolve("tinker://run/sampler_weights/000050")


def test_a_rank_above_max_lora_rank_is_refused_naming_the_rank(root, place, tiny_model_dirs):
    place(f"{RUN}/sampler_weights/000060")                # the template is rank 8
    cfg = load_model_config(tiny_model_dirs[BASE])
    name = f"tinker://{RUN}/sampler_weights/000060"
    assert CheckpointStore(root, BASE, cfg, max_lora_rank=8).resolve(name).rank == 8
    with pytest.raises(CheckpointInvalid, match=r"_proj: LoRA rank 8 is above the largest rank "
                       r"this server holds, 4 \(serve it with --max-lora-rank 8 or more\)"):
        CheckpointStore(root, BASE, cfg, max_lora_rank=4).resolve(name)


def test_listing_shows_complete_checkpoints_for_this_base_model(store, place):
    place(f"{RUN}/sampler_weights/000010")
    place(f"{RUN}/weights/000010")
    place("by-hand/final")
    place(f"{RUN}/sampler_weights/000020", complete=False)
    edit_config(place(f"{RUN}/sampler_weights/000030"), base_model_name_or_path="Qwen/Qwen3-8B")
    listed = {info.name: info for info in store.list()}
    assert set(listed) == {f"tinker://{RUN}/sampler_weights/000010", f"tinker://{RUN}/weights/000010",
                           "by-hand/final"}
    info = listed[f"tinker://{RUN}/sampler_weights/000010"]
    assert info.rank == 8
    assert info.created == (info.path / "checkpoint_complete").stat().st_mtime
    assert info.chat_template is None


def test_a_checkpoint_completed_after_the_first_listing_is_listed_and_servable(store, place):
    path = place("run/sampler_weights/000010", complete=False)
    assert store.list() == []
    (path / "checkpoint_complete").touch()
    assert [info.name for info in store.list()] == ["tinker://run/sampler_weights/000010"]
    assert store.resolve("tinker://run/sampler_weights/000010").path == path.resolve()


def test_a_checkpoints_own_chat_template_is_exposed(store, place):
    path = place("run/sampler_weights/final")
    (path / "chat_template.jinja").write_text("{{ messages }}")
    assert store.resolve("tinker://run/sampler_weights/final").chat_template == path / "chat_template.jinja"
