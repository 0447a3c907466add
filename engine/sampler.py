"""From one step's logits to one token per sequence, via the kernels' sampling ops.

Logprobs are always the log-softmax of the raw logits, before penalties, bias,
temperature and truncation: they describe the model, not the sampling recipe, and so
they equal what `compute_logprobs` returns for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TopLogprobs
from engine.sequence import Sequence
from kernels import get_sampling_ops


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs | None]   # None for rows that asked for none


class Sampler:
    def __init__(self, backend: str, device: torch.device, eos_token_ids: tuple[int, ...]):
        self.ops = get_sampling_ops(backend, device)
        self.device = device
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [num_seqs, vocab] float32 raw logits, one row per sequence."""
        processed = self._process(logits, seqs)
        params = [s.params for s in seqs]
        tokens = self.ops.sample(
            processed,
            self._tensor([p.temperature for p in params], torch.float32),
            self._tensor([p.top_k for p in params], torch.int32),
            self._tensor([p.top_p for p in params], torch.float32),
            self._tensor([p.min_p for p in params], torch.float32),
            self._tensor([s.seed for s in seqs], torch.int64),
            self._tensor([len(s.output_ids) for s in seqs], torch.int64),
        )
        for row, seq in enumerate(seqs):
            if seq.forced_ids:  # e.g. the end of a trace whose thinking budget is spent
                tokens[row] = seq.forced_ids[0]
        return self.logprobs(logits, tokens, [p.logprobs for p in params])

    def logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor,
                 num_top: list[int]) -> SampleResult:
        """Raw log-softmax of `token_ids` [n] under `logits` [n, vocab], plus top-k per row."""
        k = max(num_top, default=0)
        chosen, top_ids, top_lps = self.ops.logprobs(logits, token_ids, k)
        top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
        tops = [list(zip(ids[:n], lps[:n])) if n else None
                for ids, lps, n in zip(top_ids, top_lps, num_top)]
        return SampleResult(token_ids.tolist(), chosen.tolist(), tops)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties and biases, on a copy so the raw logits stay for the logprobs."""
        bias = self._bias_entries(seqs)
        penalized = [s.params.repetition_penalty != 1.0 or s.params.presence_penalty != 0.0
                     or s.params.frequency_penalty != 0.0 for s in seqs]
        if not bias and not any(penalized):
            return logits
        logits = logits.clone()
        if any(penalized):
            self.ops.apply_penalties(
                logits,
                self._padded([s.prompt_ids for s in seqs]),
                self._padded([s.output_ids for s in seqs]),
                self._tensor([s.params.repetition_penalty for s in seqs], torch.float32),
                self._tensor([s.params.presence_penalty for s in seqs], torch.float32),
                self._tensor([s.params.frequency_penalty for s in seqs], torch.float32))
        if bias:
            rows, ids, values = zip(*bias)
            self.ops.apply_logit_bias(logits, self._tensor(rows, torch.int64),
                                      self._tensor(ids, torch.int64),
                                      self._tensor(values, torch.float32))
        return logits

    def _bias_entries(self, seqs: list[Sequence]) -> list[tuple[int, int, float]]:
        """Sparse (row, token, value) entries: logit_bias, and a ban on every token that
        would stop a sequence before it has its `min_tokens`."""
        entries = []
        for row, seq in enumerate(seqs):
            p = seq.params
            entries += [(row, tok, float(v)) for tok, v in p.logit_bias.items()]
            if len(seq.output_ids) < p.min_tokens:
                stops = p.stop_token_set | (set(self.eos_token_ids) if p.eos_stops else set())
                entries += [(row, tok, float("-inf")) for tok in sorted(stops)]
        return entries

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        """[num_rows, longest] int64, padded with -1."""
        width = max(1, max(len(r) for r in rows))
        return self._tensor([r + [-1] * (width - len(r)) for r in rows], torch.int64)
