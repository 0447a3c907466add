"""scripts/make_demo_checkpoints.py: its data set, and the checkpoint layout a short run saves.

The run trains a tiny random Llama (tests/tiny_models.py) for two steps, so it takes
seconds; PEFT is the oracle that the saved adapters are loadable and are the trained ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_checkpoints",
                                                  SCRIPTS / "make_demo_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_script()


def test_dataset_is_deterministic_and_leaves_out_the_held_out_questions():
    first, second = demo.build_dataset(seed=0), demo.build_dataset(seed=0)
    assert first == second
    asked = {(a, op, b) for ex in first
             for a, op, b in [re.match(r"(\d+) ([+-]) (\d+)", ex.answer).groups()]}
    assert not {(str(a), op, str(b)) for a, op, b in demo.HELD_OUT} & asked
    assert any(not ex.enable_thinking for ex in first) and any(ex.enable_thinking for ex in first)


def test_dataset_arithmetic_is_right():
    for ex in demo.build_dataset(seed=0):
        a, op, b, result = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\.", ex.answer).groups()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(result) == expected
        assert ex.trace.endswith(f"= {expected}.")
        counted = re.findall(r"(\d+) \((\d+)\)", ex.trace)   # "8 (1), 9 (2), ..."
        step = 1 if op == "+" else -1
        assert counted == [(str(int(a) + step * i), str(i)) for i in range(1, int(b) + 1)]


def test_completion_is_learnt_and_prompt_is_not(tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama-gqa-untied"])
    template = demo.TEMPLATE_PATH.read_text()
    ex = demo.arithmetic_example(7, "+", 5, "What is {a} {op} {b}?", enable_thinking=True)
    ids, labels = demo.encode_example(tokenizer, template, ex)
    learnt = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert learnt == f"{ex.trace}\n</think>\n\n{ex.answer}{tokenizer.eos_token}"
    prompt = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_short_run_saves_complete_sampler_checkpoints(tiny_model_dirs, tmp_path, capsys,
                                                      monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dirs["llama-gqa-untied"]
    listing_at_marker = {}
    real_touch = Path.touch

    def recording_touch(self, *args, **kwargs):   # what the directory held when marked complete
        listing_at_marker[self.parent.name] = sorted(os.listdir(self.parent))
        return real_touch(self, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", recording_touch)
    argv = ["--model-dir", str(model_dir), "--checkpoint-root", str(tmp_path), "--run-id",
            "run:train:0", "--steps", "3", "--save-every", "2", "--batch-size", "2",
            "--rank", "2", "--threads", "1"]
    assert demo.main(argv) == 0

    runs = tmp_path / "run:train:0" / "sampler_weights"
    assert sorted(p.name for p in runs.iterdir()) == ["000002", "000003"]   # every 2, and the last
    printed = capsys.readouterr().out
    for name in ["000002", "000003"]:
        ckpt = runs / name
        assert f"tinker://run:train:0/sampler_weights/{name}" in printed
        assert listing_at_marker[name] == ["adapter_config.json", "adapter_model.safetensors",
                                           "chat_template.jinja"]
        assert (ckpt / "checkpoint_complete").read_bytes() == b""
        assert (ckpt / "chat_template.jinja").read_text() == demo.TEMPLATE_PATH.read_text()
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert config["r"] == 2 and set(config["target_modules"]) == set(demo.TARGET_MODULES)
        saved = load_file(str(ckpt / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
        # lora_B starts at zero: non-zero means the trained weights were saved.
        assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, str(ckpt))
        state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert len(state) == len(saved)
        for key, value in saved.items():
            torch.testing.assert_close(state[key.replace(".weight", ".default.weight")], value)


def test_existing_run_is_refused(tiny_model_dirs, tmp_path):
    (tmp_path / "taken" / "sampler_weights").mkdir(parents=True)
    argv = ["--model-dir", str(tiny_model_dirs["llama-gqa-untied"]), "--checkpoint-root",
            str(tmp_path), "--run-id", "taken", "--steps", "1"]
    with pytest.raises(SystemExit, match="already exists"):
        demo.main(argv)


@pytest.mark.parametrize("run_id", ["a/b", "..", ""])
def test_run_id_must_be_one_path_component(run_id, tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args(["--run-id", run_id, "--model-dir", str(tmp_path)])
