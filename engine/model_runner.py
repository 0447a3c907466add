"""Runs one scheduled batch: flat tensors in, one sampled token per finished prefill/decode out.

The batch is laid out as the attention layer expects: decodes (one new token) first,
then prefill chunks. Logits are computed only for the rows that need them: the last
token of each sequence that is due to sample, and prompt positions whose logprobs
were asked for. In a step that mixes checkpoints, each row's adapter slot goes down
with the attention metadata (`meta.lora`), and the rows of the logits get their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from engine.config import EngineConfig, ModelConfig
from engine.layers.attention import AttentionMetadata
from engine.layers.linear_attention import LinearAttentionState, StateSlotMetadata
from engine.outputs import SeqStepResult
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from kernels.lora_mapping import LoraMapping

Slots = dict[Path | None, int]   # checkpoint -> its adapter slot, in a step that mixes them


def kv_cache_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_attention_layers * block_size * cfg.kv_size * dtype.itemsize


class CacheCapacity(NamedTuple):
    num_blocks: int
    num_state_slots: int        # live linear-attention states, one per running sequence
    num_state_snapshots: int    # kept states at prompts' block boundaries (prefix caching)

    @property
    def num_state_rows(self) -> int:
        """Rows of the state pool: the live slots', then the kept states'."""
        return self.num_state_slots + self.num_state_snapshots


def cache_capacity(cfg: ModelConfig, ecfg: EngineConfig) -> CacheCapacity:
    """The KV blocks and state rows for the memory budget (call once the weights are loaded).

    A model with linear-attention layers gets a state slot for each sequence a step may
    hold, `max_num_seqs`, and with prefix caching as many rows again for kept states
    (engine.state_snapshots), but at most half the budget's worth; the KV blocks get the
    rest (with `num_kv_blocks` given, the state pool comes on top).
    """
    spec = cfg.linear_attention
    keeps_states = spec is not None and ecfg.enable_prefix_caching
    # A slot's bytes: its live row, and with prefix caching a row of kept state beside it.
    slot_bytes = spec.state_bytes(ecfg.dtype) * (2 if keeps_states else 1) if spec else 0
    if ecfg.num_kv_blocks:
        num_blocks, num_slots = ecfg.num_kv_blocks, ecfg.max_num_seqs if spec else 0
    else:
        budget = ecfg.kv_cache_bytes()
        num_slots = min(ecfg.max_num_seqs, budget // 2 // slot_bytes) if spec else 0
        num_blocks = ((budget - num_slots * slot_bytes)
                      // kv_cache_block_bytes(cfg, ecfg.block_size, ecfg.dtype))
    if num_blocks < 1 or (spec and num_slots < 1):
        raise ValueError("no memory is left for the KV cache: raise gpu_memory_utilization "
                         "or give kv_cache_memory / num_kv_blocks")
    return CacheCapacity(num_blocks, num_slots, num_slots if keeps_states else 0)


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str, num_state_rows: int = 0) -> list:
    """One cache per layer, by its type: an attention layer's paged KV tensor (the k heads,
    then the v heads: see engine.layers.attention), a linear-attention layer's state pool."""
    spec = cfg.linear_attention
    linear = set(spec.layers) if spec else set()
    shape = (2 * cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
    return [LinearAttentionState.allocate(spec, num_state_rows, dtype, device) if i in linear
            else torch.zeros(shape, dtype=dtype, device=device) for i in range(cfg.num_layers)]


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, ecfg: EngineConfig,
                 num_blocks: int, num_state_rows: int = 0) -> None:
        self.model, self.cfg, self.block_size = model, cfg, ecfg.block_size
        self.device = torch.device(ecfg.device)
        self.kv_caches = allocate_kv_caches(cfg, num_blocks, ecfg.block_size, ecfg.dtype,
                                            self.device, num_state_rows)
        self.sampler = Sampler(ecfg.sampler_backend, self.device, cfg.eos_token_ids)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch,
                slots: Slots | None = None) -> dict[Sequence, SeqStepResult]:
        """Run the step; `slots`: each checkpoint's adapter slot when the step mixes them
        (None: the weights serve every row as they are)."""
        # Decodes first, shortest context first (attention groups them by length).
        order = sorted(range(len(batch.seqs)), key=lambda i: (batch.num_new_tokens[i] != 1,
                                                              batch.seqs[i].num_tokens))
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        self._copy_blocks(batch.block_copies)
        copy_state_rows(self.kv_caches, batch.state_copies)
        input_ids, positions, meta = self._prepare(seqs, counts)
        row_slots = None
        if slots is not None:
            row_slots = [slots[seq.checkpoint] for seq, n in zip(seqs, counts) for _ in range(n)]
            meta.lora = LoraMapping.from_row_slots(row_slots, self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        results = {seq: SeqStepResult() for seq in seqs}
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        logits = _Logits(self.model, hidden, row_slots, self.device)
        self._prompt_logprobs(logits, seqs, counts, starts, results)
        self._sample(logits, seqs, counts, starts, results)
        return results

    def _prepare(self, seqs: list[Sequence], counts: list[int]):
        input_ids, positions, slots = [], [], []
        for seq, n in zip(seqs, counts):
            start = seq.num_computed_tokens
            input_ids += seq.token_slice(start, start + n)
            positions += range(start, start + n)
            slots += [seq.block_table[pos // self.block_size] * self.block_size
                      + pos % self.block_size for pos in range(start, start + n)]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        num_decodes = sum(1 for n in counts if n == 1)
        state_slots = None if self.cfg.linear_attention is None else StateSlotMetadata.build(
            [s.state_slot for s in seqs], [s.num_computed_tokens == 0 for s in seqs], num_decodes,
            self.device)
        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots), block_tables=as_tensor(tables),
            context_lens=[s.num_computed_tokens + n for s, n in zip(seqs, counts)],
            query_lens=counts, num_decodes=num_decodes, block_size=self.block_size,
            state_slots=state_slots)
        return as_tensor(input_ids), as_tensor(positions), meta

    def _sample(self, logits, seqs, counts, starts, results) -> None:
        """One token for each sequence whose step reaches its end, and one from the same
        logits for each of its followers (the other samples of its prompt, about to fork)."""
        due = [i for i, (s, n) in enumerate(zip(seqs, counts))
               if s.num_computed_tokens + n == s.num_tokens]
        if not due:
            return
        logits = logits([starts[i + 1] - 1 for i in due])   # [num_due, vocab] float32
        samplers = [(j, s) for j, i in enumerate(due) for s in (seqs[i], *seqs[i].followers)]
        if len(samplers) > len(due):
            logits = logits[torch.tensor([j for j, _ in samplers], device=self.device)]
        out = self.sampler(logits, [s for _, s in samplers])
        for k, (_, seq) in enumerate(samplers):
            r = results.setdefault(seq, SeqStepResult())
            r.token_id, r.logprob, r.top_logprobs = out.token_ids[k], out.logprobs[k], out.top_logprobs[k]

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (a fork's partial last block) in every layer's cache."""
        if not copies:
            return
        src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*copies))
        for kv_cache in self.kv_caches:                # [2 * kv_heads, blocks, block_size, D]
            if isinstance(kv_cache, torch.Tensor):
                kv_cache[:, dst] = kv_cache[:, src]

    def _prompt_logprobs(self, logits, seqs, counts, starts, results) -> None:
        """Logprob of each prompt token given its prefix, for the prompt tokens that this
        chunk's logits predict (position p's logits predict token p + 1)."""
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if not seq.wants_prompt_logprobs:
                continue
            first = seq.num_computed_tokens
            last = min(first + n, seq.num_prompt_tokens - 1)    # positions predicting a prompt token
            if last <= first:
                continue
            rows = list(range(starts[i], starts[i] + last - first))
            targets = torch.tensor(seq.prompt_ids[first + 1:last + 1], device=self.device)
            out = self.sampler.logprobs(logits(rows), targets,
                                        [seq.params.prompt_logprobs] * len(targets))
            r = results[seq]
            r.prompt_logprobs, r.prompt_top_logprobs = out.logprobs, out.top_logprobs


def copy_state_rows(caches: list, copies: list[tuple[int, int]]) -> None:
    """Copy rows of every linear-attention layer's state pool, (source, destination) in
    order: a row may be written and then read (a state kept, then resumed from in the
    same step), so the copies go in runs that read no row an earlier copy of the run
    writes, each run at once."""
    states = [cache for cache in caches if isinstance(cache, LinearAttentionState)]
    for run in _independent_runs(copies):
        src, dst = (torch.tensor(rows, device=states[0].conv.device) for rows in zip(*run))
        for state in states:
            state.conv[dst] = state.conv[src]
            state.recurrent[dst] = state.recurrent[src]


def _independent_runs(copies: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """`copies` cut into consecutive runs in which no copy reads or writes a row that an
    earlier copy of its run writes."""
    runs: list[list[tuple[int, int]]] = []
    written: set[int] = set()
    for src, dst in copies:
        if not runs or src in written or dst in written:
            runs.append([])
            written = set()
        runs[-1].append((src, dst))
        written.add(dst)
    return runs


class _Logits:
    """The logits of chosen rows of a step's hidden states, each row with its adapter."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor, row_slots: list[int] | None,
                 device: torch.device) -> None:
        self.model, self.hidden, self.row_slots, self.device = model, hidden, row_slots, device

    def __call__(self, rows: list[int]) -> torch.Tensor:
        """rows -> float32 logits [len(rows), vocab]."""
        lora = None if self.row_slots is None else LoraMapping.from_row_slots(
            [self.row_slots[r] for r in rows], self.device)
        picked = self.hidden[torch.tensor(rows, device=self.device)]
        return self.model.compute_logits(picked, lora)
