"""Gated DeltaNet over state slots against transformers' module run on whole sequences.

Three sequences go through two steps that mix every case the engine makes: a prompt
prefilled in two chunks, a decode continuing a prefilled prompt, a one-token prompt
starting as a decode, and a slot reused after another sequence left stale state in it.
"""

from __future__ import annotations

import torch
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from engine.config import LinearAttentionSpec
from engine.layers.attention import AttentionMetadata
from engine.layers.linear_attention import GatedDeltaNet, LinearAttentionState, StateSlotMetadata

HIDDEN = 32
SPEC = LinearAttentionSpec(layers=(0,), num_key_heads=2, num_value_heads=4, key_head_dim=8,
                           value_head_dim=8, conv_kernel=4)


def layer_pair() -> tuple[GatedDeltaNet, Qwen3_5GatedDeltaNet]:
    config = Qwen3_5TextConfig(
        hidden_size=HIDDEN, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=1)
    torch.manual_seed(0)
    theirs = Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
        theirs.A_log.uniform_(-1.0, 1.5)
    ours = GatedDeltaNet(HIDDEN, SPEC, config.rms_norm_eps)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs


def step(layer, pool, xs_and_slots, computed):
    """One engine step: (x rows, slot) per sequence, decodes first; `computed`: tokens
    each sequence had before this step."""
    xs = [x for x, _ in xs_and_slots]
    lens = [len(x) for x in xs]
    num_decodes = sum(n == 1 for n in lens)
    slots = [slot for _, slot in xs_and_slots]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(lens), dtype=torch.int64),
        block_tables=torch.zeros(len(xs), 1, dtype=torch.int64),
        context_lens=[c + n for c, n in zip(computed, lens)], query_lens=lens,
        num_decodes=num_decodes, block_size=16,
        state_slots=StateSlotMetadata.build(slots, [c == 0 for c in computed], num_decodes, "cpu"))
    with torch.no_grad():
        return layer(torch.cat(xs), pool, meta).split(lens)


def test_chunks_decodes_and_fresh_slots_match_transformers_on_whole_sequences():
    ours, theirs = layer_pair()
    gen = torch.Generator().manual_seed(1)
    seq_a, seq_b, seq_c = (torch.randn(n, HIDDEN, generator=gen) for n in (9, 4, 2))
    pool = LinearAttentionState.allocate(SPEC, num_slots=4, dtype=torch.float32, device="cpu")
    pool.conv.normal_()          # stale state left by earlier sequences: fresh ones must ignore it
    pool.recurrent.normal_()
    # Step 1: a's first 5 tokens and b's first 3, both fresh.
    a1, b1 = step(ours, pool, [(seq_a[:5], 2), (seq_b[:3], 0)], computed=[0, 0])
    # Step 2: decodes first (b's 4th token, c's one-token prompt in slot 3), then a's rest.
    b2, c1, a2 = step(ours, pool, [(seq_b[3:], 0), (seq_c[:1], 3), (seq_a[5:], 2)],
                      computed=[3, 0, 5])
    with torch.no_grad():
        want = {name: theirs(x[None])[0] for name, x in (("a", seq_a), ("b", seq_b), ("c", seq_c))}
    torch.testing.assert_close(torch.cat((a1, a2)), want["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat((b1, b2)), want["b"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1, want["c"][:1], atol=1e-5, rtol=1e-5)
