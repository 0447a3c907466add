"""/v1/models and requests for checkpoints in the service's forms (download directory,
archive), on a server over a tiny model: listed once by tinker:// name, served, and the
bad archives answered with 400 / 409 naming the checkpoint."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import openai
import pytest

from tests.api.conftest import API_KEY, running_server
from tests.engine.checkpoints.helpers import pack_archive, save_peft_adapter

BASE = "qwen3-qk-norm-tied"
RUN = "abc:train:0"


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forms-server")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POKESERVE_HOME", str(tmp / "home"))   # the server's archive cache
        with running_server(tiny_model_dirs[BASE], tmp) as srv:
            yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def adapter(tiny_model_dirs, tmp_path_factory) -> Path:
    return save_peft_adapter(tiny_model_dirs[BASE], tmp_path_factory.mktemp("adapter") / "a", r=4)


def model_ids(client) -> list[str]:
    return [m.id for m in client.models.list().data]


def test_downloaded_and_archived_checkpoints_are_listed_once_and_served(client, server, adapter):
    shutil.copytree(adapter, server.checkpoint_root / f"{RUN}_sampler_weights_000010")
    pack_archive(adapter, server.checkpoint_root / RUN / "sampler_weights" / "000020.tar")
    pack_archive(adapter, server.checkpoint_root / f"{RUN}_sampler_weights_000020.tar")  # hidden
    names = [f"tinker://{RUN}/sampler_weights/{step}" for step in ("000010", "000020")]
    assert sorted(i for i in model_ids(client) if i in names) == names   # each once
    for name in names:
        completion = client.completions.create(model=name, prompt="the quick", max_tokens=3,
                                               temperature=0)
        assert completion.model == name and completion.usage.completion_tokens == 3


def test_an_unsafe_archive_is_a_400_naming_the_checkpoint(client, server, adapter, tmp_path):
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    pack_archive(adapter, server.checkpoint_root / f"{RUN}_sampler_weights_evil.tar",
                 extra=[(link, None)])
    name = f"tinker://{RUN}/sampler_weights/evil"
    assert name not in model_ids(client)
    with pytest.raises(openai.BadRequestError, match=f"`{name}` cannot be served: .*symbolic link"):
        client.completions.create(model=name, prompt="hi", max_tokens=2)


def test_an_archive_still_being_written_is_a_409(client, server, adapter):
    archive = pack_archive(adapter, server.checkpoint_root / f"{RUN}_sampler_weights_000030.tar")
    whole = archive.read_bytes()
    archive.write_bytes(whole[:len(whole) // 2])
    name = f"tinker://{RUN}/sampler_weights/000030"
    assert name not in model_ids(client)
    with pytest.raises(openai.ConflictError, match="still being written"):
        client.completions.create(model=name, prompt="hi", max_tokens=2)
    archive.write_bytes(whole)
    assert name in model_ids(client)
