"""`pokeserve export`: a merged checkpoint as a plain Hugging Face model. Oracles: the
export loaded by transformers alone against pokeserve serving the checkpoint and against
PEFT over the base; the base's own hub tensors for the layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine.models.hub_weights as hub_weights
from api.cli import main as cli
from engine.checkpoints.export import export_checkpoint
from engine.text.tokenizer import Tokenizer
from tests.engine.checkpoints.exports import (
    assert_export_serves_like_the_checkpoint,
    hub_tensors,
    transformers_logprobs_fn,
)
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    hand_merged_qwen3_moe,
    peft_logprobs_fn,
    save_peft_adapter,
    to_training_service_layout,
)
from tests.engine.checkpoints.test_expert_adapter import service_adapter

TIED = "qwen3-qk-norm-tied"
NAME = "tinker://run:train:0/sampler_weights/000080"
BASE_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
OWN_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def base(tiny_model_dirs, tmp_path_factory) -> Path:
    """The tied tiny Qwen3 with a chat template of its own."""
    from transformers import AutoTokenizer

    base = Path(shutil.copytree(tiny_model_dirs[TIED], tmp_path_factory.mktemp("base") / TIED))
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = BASE_TEMPLATE
    tokenizer.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint root, the PEFT adapter it holds as the training service names it: the
    head as `unembed_tokens`), with its own chat template."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    peft = save_peft_adapter(base, tmp / "peft", seed=3, targets=[*ALL_LINEAR, "lm_head"])
    served = to_training_service_layout(peft, tmp / "root" / "run:train:0" / "sampler_weights" / "000080")
    (served / "chat_template.jinja").write_text(OWN_TEMPLATE)
    return tmp / "root", peft


@pytest.fixture(scope="module")
def exported(base, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "merged"
    # Small shards: the index is written and read back too.
    return export_checkpoint(NAME, out, model_dir=base, checkpoint_root=checkpoint[0],
                             progress=False, max_shard_bytes=200_000)


def test_an_export_run_by_transformers_alone_matches_pokeserve_serving_the_checkpoint(
        exported, base, checkpoint):
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(exported).apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=False)
    assert Tokenizer(base).encode_chat(MESSAGES, chat_template=OWN_TEMPLATE) == prompt
    tokens = assert_export_serves_like_the_checkpoint(exported, base, checkpoint[0], NAME, prompt)
    peft = peft_logprobs_fn(base, checkpoint[1])(prompt + tokens)   # the adapter, unmerged
    torch.testing.assert_close(transformers_logprobs_fn(exported)(prompt + tokens), peft,
                               atol=1e-4, rtol=0)


def test_a_tied_base_with_an_unembed_adapter_is_exported_untied_and_says_so(exported, base):
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["pokeserve_export"] == {"checkpoint": NAME, "untied_lm_head": True,
                                        "dequantized": None}
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(hub_tensors(base)) | {"lm_head.weight"}
    tensors = hub_tensors(exported)
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.embed_tokens.weight"], hub_tensors(base)["model.embed_tokens.weight"])


def test_the_checkpoints_own_chat_template_is_exported(exported):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exported).chat_template == OWN_TEMPLATE
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize("family", ["llama-gqa-untied", "qwen2-qkv-bias", TIED])
def test_exporting_a_base_writes_its_hub_tensors_back_bit_for_bit(tiny_model_dirs, tmp_path, family):
    # The fused q/k/v (with Qwen2's biases) and gate/up are split back into the hub's names.
    base = tiny_model_dirs[family]
    out = assert_base_exports_bit_for_bit(base, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == json.loads((base / "config.json").read_text())[
        "tie_word_embeddings"]
    assert config["pokeserve_export"] == {"checkpoint": None, "untied_lm_head": False,
                                        "dequantized": None}


@pytest.mark.parametrize("family", ["qwen3_5-text", "qwen3_5-vl-tied", "qwen3_5_moe-text"])
def test_exporting_a_qwen3_5_base_writes_its_hub_tensors_back_bit_for_bit(hybrid_model_dirs,
                                                                         tmp_path, family):
    # in_proj_qkv stays fused (it is in the hub); the vision tower is copied through.
    assert_base_exports_bit_for_bit(hybrid_model_dirs[family], tmp_path / "out")


def assert_base_exports_bit_for_bit(base: Path, out: Path) -> Path:
    """Export the base model alone to `out`: its hub tensors, every one, as they were."""
    export_checkpoint(None, out, model_dir=base, progress=False)
    original, written = hub_tensors(base), hub_tensors(out)
    assert written.keys() == original.keys()
    for name in original:
        assert torch.equal(written[name], original[name]), name
    return out


def test_a_base_without_its_own_template_keeps_the_bases(base, tmp_path):
    from transformers import AutoTokenizer

    root = tmp_path / "root"
    save_peft_adapter(base, root / "plain", targets=["q_proj"], r=2)
    out = export_checkpoint("plain", tmp_path / "out", model_dir=base, checkpoint_root=root,
                            progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == BASE_TEMPLATE
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True   # an adapter off the head keeps it tied
    assert "lm_head.weight" not in hub_tensors(out)


class Crash(BaseException):
    """What a kill or Ctrl-C does to the export half-way (not an Exception)."""


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_export_leaves_nothing_at_out_dir(base, checkpoint, tmp_path, monkeypatch,
                                                         existing):
    out = tmp_path / "exports" / "merged"
    if existing:   # an earlier export being replaced with --force stays whole
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
    save_file = hub_weights.save_file
    written = []

    def crash_on_second_shard(tensors, path, metadata=None):
        if written:
            raise Crash
        save_file(tensors, path, metadata=metadata)
        written.append(path)

    monkeypatch.setattr(hub_weights, "save_file", crash_on_second_shard)
    with pytest.raises(Crash):
        export_checkpoint(NAME, out, model_dir=base, checkpoint_root=checkpoint[0], force=True,
                          progress=False, max_shard_bytes=200_000)
    assert written and not written[0].exists()   # a shard was on disk, and is gone
    assert sorted(p.name for p in out.parent.iterdir()) == (["merged"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["config.json"]


def test_the_cli_refuses_to_overwrite_without_force(base, checkpoint, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep").write_text("mine")
    args = ["export", "--model", str(base), "--checkpoint-root", str(checkpoint[0]), NAME, str(out)]
    assert cli(args) == 1
    assert "already exists; --force replaces it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert cli([*args, "--force", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in hub_tensors(out).values()} == {torch.bfloat16}


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_a_moe_base_is_exported_with_one_tensor_per_expert_whichever_its_layout(
        tiny_moe_model_dirs, tmp_path, layout):
    out = export_checkpoint(None, tmp_path / "out", model_dir=tiny_moe_model_dirs[layout],
                            progress=False)
    hub, written = hub_tensors(tiny_moe_model_dirs["hub"]), hub_tensors(out)   # as save_pretrained
    assert written.keys() == hub.keys()
    for name in hub:
        assert torch.equal(written[name], hub[name]), name


def test_a_moe_export_with_an_expert_adapter_matches_a_hand_merge(tiny_moe_model_dirs, tmp_path):
    base = tiny_moe_model_dirs["hub"]
    adapter = service_adapter(base, tmp_path / "root" / "moe-adapter", router=True)
    out = export_checkpoint("moe-adapter", tmp_path / "out", model_dir=base,
                            checkpoint_root=tmp_path / "root", progress=False)
    ids = [5, 17, 42, 99, 7, 23, 61, 130, 8, 77]
    torch.testing.assert_close(transformers_logprobs_fn(out)(ids),
                               hand_merged_qwen3_moe(base, adapter)(ids), atol=1e-4, rtol=0)
