"""Switching the live model between checkpoints: exact restores, tied embeddings, the cache."""

from __future__ import annotations

import shutil

import pytest
import torch

import engine.checkpoints.merge as lora_manager
from engine.checkpoints.adapter import load_adapter
from engine.checkpoints.errors import CheckpointInvalid
from engine.checkpoints.merge import AdapterCache, LoraManager
from engine.models.loader import load_model
from engine.models.registry import load_model_config
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    assert_bit_identical,
    assert_switching_a_b_a_then_base_is_bit_exact,
    engine_logprobs_fn,
    load_engine_model,
    save_peft_adapter,
    weights,
)

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
TIED = "llama3-rope-scaling"


@pytest.fixture
def tied_setup(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs[TIED]
    a = save_peft_adapter(model_dir, tmp_path / "a", targets=[*ALL_LINEAR, "lm_head"], seed=1)
    b = save_peft_adapter(model_dir, tmp_path / "b", r=2, targets=["q_proj", "embed_tokens"], seed=2)
    return load_engine_model(model_dir), a, b


def test_switching_a_b_a_then_base_is_bit_exact(tied_setup):
    model, a, b = tied_setup
    assert_switching_a_b_a_then_base_is_bit_exact(model, a, b, PROMPT)
    assert model.lm_head.weight is model.embed_tokens.weight   # tied again


@pytest.mark.parametrize("adapter", [1, 2])   # a: every linear + head; b: q + embedding
def test_merging_without_base_copies_gives_the_same_weights(tied_setup, tiny_model_dirs, adapter):
    model, *adapters = tied_setup
    LoraManager(model).activate(adapters[adapter - 1])
    one_way_model = load_engine_model(tiny_model_dirs[TIED])
    one_way = LoraManager(one_way_model, keep_base=False)
    one_way.activate(adapters[adapter - 1])
    assert_bit_identical(weights(one_way_model), weights(model))
    assert not one_way._base   # merged in place: no copies kept
    with pytest.raises(RuntimeError, match="merges once"):
        one_way.activate(None)


def test_head_adapter_on_tied_model_leaves_the_input_embedding_alone(tied_setup, tmp_path, tiny_model_dirs):
    model, _, _ = tied_setup
    head_only = save_peft_adapter(tiny_model_dirs[TIED], tmp_path / "head", targets=["lm_head"])
    base_embedding = model.embed_tokens.weight.clone()
    LoraManager(model).activate(head_only)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, base_embedding)
    assert not torch.equal(model.lm_head.weight, base_embedding)


def test_embedding_adapter_on_tied_model_leaves_the_head_alone(tied_setup):
    model, _, b = tied_setup   # b adapts embed_tokens
    base_embedding = model.embed_tokens.weight.clone()
    LoraManager(model).activate(b)
    assert torch.equal(model.lm_head.weight, base_embedding)
    assert not torch.equal(model.embed_tokens.weight, base_embedding)


def test_switching_back_reuses_the_cached_adapter(tied_setup, monkeypatch):
    model, a, b = tied_setup
    loads = []
    real_load = lora_manager.load_adapter
    monkeypatch.setattr(lora_manager, "load_adapter",
                        lambda path, *args: loads.append(path) or real_load(path, *args))
    manager = LoraManager(model)
    for checkpoint in (a, b, a, None, b):
        manager.activate(checkpoint)
    assert loads == [a.resolve(), b.resolve()]


def test_a_rewritten_checkpoint_is_read_again(tied_setup, tiny_model_dirs):
    model, a, _ = tied_setup
    manager, forward = LoraManager(model), engine_logprobs_fn(model)
    manager.activate(a)
    first = forward(PROMPT)
    save_peft_adapter(tiny_model_dirs[TIED], a, targets=[*ALL_LINEAR, "lm_head"], seed=7)
    manager.activate(a)
    assert not torch.equal(forward(PROMPT), first)


def test_a_checkpoint_that_fails_to_load_leaves_the_model_as_it_was(tied_setup):
    model, a, b = tied_setup
    manager = LoraManager(model)
    manager.activate(a)
    a_weights = weights(model)
    broken = b / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(CheckpointInvalid, match="corrupt"):
        manager.activate(b)
    assert_bit_identical(weights(model), a_weights)
    assert manager.active == a.resolve()


def test_a_checkpoint_deleted_while_active_keeps_serving_what_is_merged(tied_setup):
    model, a, b = tied_setup
    manager = LoraManager(model)
    manager.activate(a)
    a_weights = weights(model)
    shutil.rmtree(a)
    manager.activate(a)   # the requests already running on it finish on the same weights
    assert_bit_identical(weights(model), a_weights)
    manager.activate(b)
    with pytest.raises(CheckpointInvalid,
                       match="Checkpoint `a` cannot be served: adapter_config.json is missing"):
        manager.activate(a)


class FakeAdapter:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cache_evicts_the_least_recently_used_adapter_to_stay_within_its_bytes():
    cache = AdapterCache(max_bytes=250)
    cache.put("a", FakeAdapter(100))
    cache.put("b", FakeAdapter(100))
    assert cache.get("a") is not None           # a is now more recent than b
    cache.put("c", FakeAdapter(100))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 200


def test_an_adapter_larger_than_the_cache_is_not_cached():
    cache = AdapterCache(max_bytes=50)
    cache.put("big", FakeAdapter(100))
    assert cache.get("big") is None and cache.nbytes == 0


def test_bfloat16_weights_get_the_float32_merge_cast_once(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama-gqa-untied"]
    cfg = load_model_config(model_dir)
    model = load_model(model_dir, cfg, "cpu", torch.bfloat16, progress=False)
    adapter_dir = save_peft_adapter(model_dir, tmp_path / "a", targets=["k_proj", "lm_head"])
    base = weights(model)
    LoraManager(model).activate(adapter_dir)
    modules = {m.module: m for m in load_adapter(adapter_dir, cfg).modules}
    k = modules["model.layers.1.self_attn.k_proj"]
    rows = slice(cfg.q_size, cfg.q_size + cfg.kv_size)
    qkv = "layers.1.self_attn.qkv_proj.weight"
    expected = (base[qkv][rows].float() + k.scale * (k.lora_b @ k.lora_a)).to(torch.bfloat16)
    assert torch.equal(model.get_parameter(qkv)[rows], expected)
    assert torch.equal(model.get_parameter(qkv)[:cfg.q_size], base[qkv][:cfg.q_size])   # q untouched
    head = modules["lm_head"]
    expected_head = (base["lm_head"].float() + head.scale * (head.lora_b @ head.lora_a)).to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight, expected_head)


def test_cache_evicts_the_least_recently_used_adapter_beyond_its_count():
    cache = AdapterCache(max_bytes=10_000, max_count=2)   # vLLM's max_cpu_loras
    for key in "abc":
        cache.put(key, FakeAdapter(10))
        cache.get("a")                                     # a stays the most recent
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 20
