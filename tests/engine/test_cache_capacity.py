"""The memory budget split between KV blocks and linear-attention state slots."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.model_runner import cache_capacity, kv_cache_block_bytes
from engine.models.qwen3_5 import Qwen3_5Config

QWEN3_5 = dict(model_type="qwen3_5_text", vocab_size=100, hidden_size=64, intermediate_size=128,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_conv_kernel_dim=4)


def test_state_slot_bytes_count_float32_recurrent_and_model_dtype_conv_states():
    spec = Qwen3_5Config.from_dict(QWEN3_5).linear_attention
    assert spec.layers == (0, 1, 2)                             # layer 3 is full attention
    conv = (2 * 2 * 16 + 4 * 16) * 3                            # channels x (kernel - 1)
    recurrent = 4 * 16 * 16
    assert spec.state_bytes(torch.bfloat16) == 3 * (conv * 2 + recurrent * 4)


def test_only_attention_layers_count_in_a_kv_block():
    cfg = Qwen3_5Config.from_dict(QWEN3_5)
    assert cfg.num_attention_layers == 1
    assert kv_cache_block_bytes(cfg, 16, torch.float32) == 2 * 1 * 16 * 2 * 16 * 4


def test_slots_take_at_most_half_the_budget_and_blocks_the_rest():
    cfg = Qwen3_5Config.from_dict(QWEN3_5)
    slot, block = cfg.linear_attention.state_bytes(torch.float32), kv_cache_block_bytes(
        cfg, 16, torch.float32)
    roomy = dict(kv_cache_memory=100 * slot, max_num_seqs=8, enable_prefix_caching=False)
    assert cache_capacity(cfg, EngineConfig(**roomy)) == ((100 * slot - 8 * slot) // block, 8, 0)
    tight = dict(roomy, kv_cache_memory=10 * slot)
    assert cache_capacity(cfg, EngineConfig(**tight)) == ((10 * slot - 5 * slot) // block, 5, 0)


def test_with_prefix_caching_each_slot_has_a_row_for_a_kept_state_beside_it():
    cfg = Qwen3_5Config.from_dict(QWEN3_5)
    slot, block = cfg.linear_attention.state_bytes(torch.float32), kv_cache_block_bytes(
        cfg, 16, torch.float32)
    roomy = EngineConfig(kv_cache_memory=100 * slot, max_num_seqs=8)
    assert cache_capacity(cfg, roomy) == ((100 * slot - 16 * slot) // block, 8, 8)
    tight = EngineConfig(kv_cache_memory=10 * slot, max_num_seqs=8)
    assert cache_capacity(cfg, tight) == ((10 * slot - 4 * slot) // block, 2, 2)
    assert cache_capacity(cfg, EngineConfig(num_kv_blocks=5, max_num_seqs=3)).num_state_rows == 6


def test_a_budget_without_room_for_one_slot_is_refused():
    cfg = Qwen3_5Config.from_dict(QWEN3_5)
    with pytest.raises(ValueError, match="no memory is left"):
        cache_capacity(cfg, EngineConfig(kv_cache_memory=cfg.linear_attention.state_bytes(
            torch.float32)))


def test_a_model_without_linear_attention_gets_no_slots_and_the_whole_budget_in_blocks():
    cfg = ModelConfig.from_dict({**QWEN3_5, "model_type": "llama"})
    block = kv_cache_block_bytes(cfg, 16, torch.float32)
    assert cfg.num_attention_layers == 4
    assert cache_capacity(cfg, EngineConfig(kv_cache_memory=50 * block)) == (50, 0, 0)
