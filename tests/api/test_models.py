"""/v1/models and checkpoint names: the base model, checkpoints saved while the server
runs, checkpoints still being written, a checkpoint's own chat template, and one found
broken only when its tensors are loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import MODEL
from tests.engine.checkpoints.helpers import save_nan_adapter, save_peft_adapter
from tests.engine.text.test_tokenizer import QWEN3_STYLE_TEMPLATE

pytestmark = pytest.mark.model

RUN = "0034d8c9-0a88-52a9-b2b7-bce7cb1e6fef:train:0"


@pytest.fixture(scope="module")
def checkpoint(server, default_model_dir) -> str:
    """A complete sampler checkpoint, written after the server started, that ships a
    Qwen3-style chat template."""
    path = server.checkpoint_root / RUN / "sampler_weights" / "000010"
    path.mkdir(parents=True)
    save_peft_adapter(default_model_dir, path, r=4)
    (path / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    return f"tinker://{RUN}/sampler_weights/000010"


def model_ids(client) -> list[str]:
    return [m.id for m in client.models.list().data]


def test_models_lists_the_base_model_first(client) -> None:
    models = client.models.list().data
    assert models[0].id == MODEL and models[0].object == "model"


def test_checkpoint_saved_after_start_is_listed(client, checkpoint) -> None:
    assert checkpoint in model_ids(client)


def test_checkpoint_still_being_written_is_not_listed_and_is_409(client, server,
                                                                  checkpoint) -> None:
    done = server.checkpoint_root / RUN / "sampler_weights" / "000010"
    writing = done.with_name("000020")
    shutil.copytree(done, writing)
    (writing / "checkpoint_complete").unlink()
    name = f"tinker://{RUN}/sampler_weights/000020"
    assert name not in model_ids(client)
    with pytest.raises(openai.ConflictError, match="checkpoint_complete"):
        client.completions.create(model=name, prompt="hi", max_tokens=2)
    (writing / "checkpoint_complete").touch()
    assert name in model_ids(client)


def test_checkpoint_chat_template_is_used_for_its_prompts(server, checkpoint,
                                                          default_model_dir: Path) -> None:
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    for kwargs in ({}, {"enable_thinking": False}):
        expected = hf.apply_chat_template(messages, chat_template=QWEN3_STYLE_TEMPLATE,
                                          add_generation_prompt=True, return_dict=False, **kwargs)
        got = server.post("/tokenize", json={"model": checkpoint, "messages": messages,
                                             "chat_template_kwargs": kwargs}).json()["tokens"]
        assert got == expected
    base = server.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert base == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_generation_through_a_checkpoint_uses_its_template_and_adapter(client, server,
                                                                       checkpoint) -> None:
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    args = dict(messages=messages, max_tokens=4, temperature=0, logprobs=True)
    tuned = client.chat.completions.create(model=checkpoint, **args)
    base = client.chat.completions.create(model=MODEL, **args)
    assert tuned.model == checkpoint
    qwen_ids = server.post("/tokenize", json={"model": checkpoint, "messages": messages})
    assert tuned.usage.prompt_tokens == len(qwen_ids.json()["tokens"])
    assert tuned.usage.prompt_tokens != base.usage.prompt_tokens
    # Same first token scored under two different weights.
    prompt = "The capital of France is"
    lp = [client.completions.create(model=m, prompt=prompt, max_tokens=1, temperature=0,
                                    logprobs=0).choices[0].logprobs.token_logprobs[0]
          for m in (MODEL, checkpoint)]
    assert lp[0] != lp[1]


@pytest.fixture(scope="module")
def nan_checkpoint(server, default_model_dir) -> str:
    save_nan_adapter(default_model_dir,
                     server.checkpoint_root / "broken:train:0" / "sampler_weights" / "nan")
    return "tinker://broken:train:0/sampler_weights/nan"


def assert_checkpoint_invalid(error: dict) -> None:
    assert "NaN" in error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == "checkpoint_invalid" and error["param"] == "model"


def test_a_checkpoint_found_broken_when_loaded_is_a_400_and_the_base_is_untouched(
        client, nan_checkpoint) -> None:
    args = dict(prompt="The capital of France is", max_tokens=4, temperature=0)
    before = client.completions.create(model=MODEL, **args).choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=nan_checkpoint, **args)
    assert_checkpoint_invalid(info.value.body)
    # Streamed, the status is sent before the adapter is loaded: an error event says it.
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(
            model=nan_checkpoint, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True))
    assert_checkpoint_invalid(info.value.body)
    assert client.completions.create(model=MODEL, **args).choices[0].text == before
