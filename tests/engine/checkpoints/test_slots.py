"""The adapter slot table: a step's adapters each get a slot (lowest free first, else the
least recently used one the step does not need), a reused slot holds only its new adapter,
and a rewritten checkpoint is a new adapter."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoints.adapter import adapter_key, load_adapter
from engine.checkpoints.slots import AdapterSlots
from kernels import get_lora_ops
from kernels.lora_mapping import LoraMapping
from tests.engine.checkpoints.helpers import load_engine_model, save_peft_adapter

FAMILY = "llama-gqa-untied"


@pytest.fixture
def setup(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs[FAMILY]
    model = load_engine_model(model_dir)
    targets = {"q": ["q_proj"], "vd": ["v_proj", "down_proj"], "x": ["q_proj", "k_proj"]}
    dirs = {n: save_peft_adapter(model_dir, tmp_path / n, seed=i, r=2, targets=t)
            for i, (n, t) in enumerate(targets.items())}
    loaded = []

    def load(key):
        loaded.append(key[0].name)
        return load_adapter(key[0], model.cfg)
    return model, dirs, AdapterSlots(model, 2, get_lora_ops("torch")), load, loaded


def test_adapters_take_the_lowest_free_slot_then_the_least_recently_used(setup):
    model, dirs, table, load, loaded = setup
    q, vd, x = (adapter_key(dirs[n]) for n in ("q", "vd", "x"))
    assert table.assign([q, vd], load) == {q: 0, vd: 1}
    assert table.assign([vd], load) == {vd: 1}          # held: not loaded again
    assert table.assign([x], load) == {x: 0}            # q was used least recently
    assert table.assign([x, vd], load) == {x: 0, vd: 1}
    assert loaded == ["q", "vd", "x"]
    with pytest.raises(ValueError, match="only 2 slots"):
        table.assign([q, vd, x], load)


def test_a_reused_slot_holds_only_its_new_adapter(setup):
    model, dirs, table, load, _ = setup
    vd, q = adapter_key(dirs["vd"]), adapter_key(dirs["q"])
    table.assign([vd], load)                             # slot 0: v_proj and down_proj
    down = model.layers[0].mlp.down_proj
    assert down.lora_slots.held[0]
    table.assign([q, adapter_key(dirs["x"])], load)      # vd's slot goes to one of them
    assert not down.lora_slots.held[0]                   # q and x adapt q_proj only
    x = torch.randn(3, down.in_features)
    with torch.inference_mode():
        assert torch.equal(down(x, LoraMapping.from_row_slots([0, 0, 1])), down(x))


def test_a_rewritten_checkpoint_is_a_new_adapter_in_a_slot_of_its_own(setup, tiny_model_dirs):
    model, dirs, table, load, loaded = setup
    old = adapter_key(dirs["q"])
    table.assign([old], load)
    save_peft_adapter(tiny_model_dirs[FAMILY], dirs["q"], seed=42, r=2, targets=["q_proj"])
    new = adapter_key(dirs["q"])
    assert new != old
    assert table.assign([new], load) == {new: 1}
    assert loaded == ["q", "q"] and table.resident == [old, new]
