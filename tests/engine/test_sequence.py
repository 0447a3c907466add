"""Sequence: slices of prompt + output without building the whole token list."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def test_token_slice_equals_slicing_the_whole_token_list():
    seq = Sequence("r", [1, 2, 3, 4], SamplingParams(), seed=0, output_ids=[5, 6, 7])
    for start in range(seq.num_tokens + 1):
        for end in range(start, seq.num_tokens + 1):
            assert seq.token_slice(start, end) == seq.token_ids[start:end]
