"""Gated DeltaNet, the linear attention of Qwen3.5, over per-sequence state slots.

Instead of a KV cache that grows with the context, each sequence keeps, per layer, a
fixed-size state in one row (its *slot*) of a preallocated pool: the conv state (the
last kernel - 1 inputs of the short convolution) and the recurrent state of the gated
delta rule. A step reads each sequence's state from its slot and writes the state after
its new tokens back, so a prompt may be prefilled in chunks and decodes continue from
wherever the prompt ended. A sequence with nothing computed before this step starts
from zeros (its slot is cleared first).

Token flow (flat batch, decodes first, as in engine.layers.attention):
    x -> in_proj_qkv -> causal conv + SiLU -> q, k, v heads; q, k L2-normalised and
         repeated to the value heads
    x -> in_proj_a, in_proj_b -> decay g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)
    gated delta rule (recurrent for the decodes, all at once; chunked per prefill)
    -> RMSNorm gated by silu(in_proj_z(x)) -> out_proj

The chunked form of a prefill and the recurrent form of a decode round differently, so a
token's bits would depend on whether it was computed in a prompt or after it, and where
its prompt was cut. In the batch-invariant mode (engine.layers.batch_invariant) a prefill
chunk runs the decodes' one-token forms (the convolution's step, the recurrent rule) token
after token: every token of a sequence is computed the same way, at a cost of one small
step per prompt token and layer (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from engine.config import LinearAttentionSpec
from engine.layers.activation import sigmoid, softplus
from engine.layers.attention import AttentionMetadata
from engine.layers.causal_conv import causal_conv1d, causal_conv1d_step
from engine.layers.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from engine.layers.linear import Linear
from engine.layers.norm import GatedRMSNorm, l2_normalize


@dataclass
class LinearAttentionState:
    """One layer's pool: row `slot` of each tensor belongs to one sequence."""

    conv: torch.Tensor        # [num_slots, conv channels, kernel - 1], the model's dtype
    recurrent: torch.Tensor   # [num_slots, value heads, key head dim, value head dim], float32

    @classmethod
    def allocate(cls, spec: LinearAttentionSpec, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str) -> "LinearAttentionState":
        conv = torch.zeros(num_slots, *spec.conv_shape, dtype=dtype, device=device)
        return cls(conv, torch.zeros(num_slots, *spec.recurrent_shape, device=device))


@dataclass
class StateSlotMetadata:
    """Per step: the slot of each sequence, in the order of AttentionMetadata's sequences."""

    slots: list[int]
    decode_slots: torch.Tensor    # [num_decodes] int64: the decodes' slots, gathered at once
    fresh_slots: torch.Tensor     # [n] int64: slots of sequences that start in this step

    @classmethod
    def build(cls, slots: list[int], fresh: list[bool], num_decodes: int,
              device: torch.device | str) -> "StateSlotMetadata":
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        return cls(slots, as_tensor(slots[:num_decodes]),
                   as_tensor([slot for slot, new in zip(slots, fresh) if new]))


class GatedDeltaNet(nn.Module):
    batch_invariant = False     # set by engine.layers.batch_invariant.enable

    def __init__(self, hidden_size: int, spec: LinearAttentionSpec, eps: float) -> None:
        super().__init__()
        self.spec = spec
        hv = spec.num_value_heads
        self.in_proj_qkv = Linear(hidden_size, 2 * spec.key_dim + spec.value_dim, bias=False)
        self.in_proj_z = Linear(hidden_size, spec.value_dim, bias=False)
        self.in_proj_b = Linear(hidden_size, hv, bias=False)
        self.in_proj_a = Linear(hidden_size, hv, bias=False)
        channels = spec.conv_shape[0]
        # Only its weight [C, 1, K] is used (engine.layers.causal_conv carries the state).
        self.conv1d = nn.Conv1d(channels, channels, spec.conv_kernel, groups=channels, bias=False)
        self.A_log = nn.Parameter(torch.empty(hv))
        self.dt_bias = nn.Parameter(torch.ones(hv))
        self.norm = GatedRMSNorm(spec.value_head_dim, eps)
        self.out_proj = Linear(spec.value_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: LinearAttentionState,
                meta: AttentionMetadata) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]; `meta.state_slots` must be set."""
        spec, num_tokens = self.spec, x.shape[0]
        fresh = meta.state_slots.fresh_slots
        if fresh.numel():
            state.conv[fresh] = 0
            state.recurrent[fresh] = 0
        weight = self.conv1d.weight[:, 0]                                # [C, K]
        invariant = self.batch_invariant
        conv_step = lambda x, s: causal_conv1d_step(x, weight, s, invariant)  # noqa: E731
        mixed = _per_sequence(                                            # [T, 2 * Kd + Vd]
            meta, state.conv, (self.in_proj_qkv(x, meta.lora),), decodes=conv_step,
            chunk=self._chunk_form(conv_step, lambda x, s: causal_conv1d(x, weight, s)))
        q, k, v = mixed.split([spec.key_dim, spec.key_dim, spec.value_dim], dim=-1)
        repeat = spec.num_value_heads // spec.num_key_heads
        q, k = (l2_normalize(t.view(num_tokens, spec.num_key_heads, spec.key_head_dim))
                .repeat_interleave(repeat, dim=1) for t in (q, k))     # [T, Hv, Dk] float32
        v = v.reshape(num_tokens, spec.num_value_heads, spec.value_head_dim)
        beta = sigmoid(self.in_proj_b(x, meta.lora), self.batch_invariant)       # [T, Hv]
        # float32 before exp: in half precision A could overflow to -inf
        g = -self.A_log.float().exp() * softplus(
            self.in_proj_a(x, meta.lora).float() + self.dt_bias, self.batch_invariant)
        out = _per_sequence(meta, state.recurrent, (q, k, v, g, beta),  # [T, Hv, Dv] float32
                            decodes=recurrent_gated_delta_rule,
                            chunk=self._chunk_form(recurrent_gated_delta_rule,
                                                   chunk_gated_delta_rule))
        z = self.in_proj_z(x, meta.lora).view(num_tokens, spec.num_value_heads,
                                              spec.value_head_dim)
        return self.out_proj(self.norm(out.to(x.dtype), z).flatten(1), meta.lora)

    def _chunk_form(self, step: Callable, chunked: Callable) -> Callable:
        """How a prefill chunk runs: `chunked`, or in the batch-invariant mode the
        decodes' one-token form `step`, token after token."""
        return partial(_token_by_token, step) if self.batch_invariant else chunked


def _token_by_token(step: Callable, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of one sequence through a one-token form: `inputs` are the chunk's rows
    [n, ...] and, last, its state (no batch dimension); `step` takes a batch of one token
    per sequence and the states [B, ...]. -> (outputs [n, ...], the state after them)."""
    *rows, state = inputs
    state, outs = state[None], []
    for t in range(rows[0].shape[0]):
        out, state = step(*(r[t:t + 1] for r in rows), state)
        outs.append(out)
    return torch.cat(outs), state[0]


def _per_sequence(meta: AttentionMetadata, pool: torch.Tensor, inputs: tuple[torch.Tensor, ...],
                  decodes: Callable, chunk: Callable) -> torch.Tensor:
    """Run a stateful op over the flat batch: `decodes` once for all the decodes (their
    states gathered from `pool` and scattered back), `chunk` for each prefill chunk.
    Each takes its rows of `inputs` and the state, and returns (output, new state)."""
    slots, d = meta.state_slots, meta.num_decodes
    outs = []
    if d:
        # index_select / index_copy_: on the CPU faster than indexing with a tensor
        out, new_state = decodes(*(t[:d] for t in inputs), pool.index_select(0, slots.decode_slots))
        pool.index_copy_(0, slots.decode_slots, new_state.to(pool.dtype))
        outs.append(out)
    start = d
    for i in range(d, len(meta.query_lens)):
        rows, slot = slice(start, start + meta.query_lens[i]), slots.slots[i]
        out, new_state = chunk(*(t[rows] for t in inputs), pool[slot])
        pool[slot] = new_state
        outs.append(out)
        start = rows.stop
    return outs[0] if len(outs) == 1 else torch.cat(outs)
