"""The batch-invariant attention (kernels/invariant_attention_ref.py): against dense
attention in float64, and a query's output bit for bit whatever is computed beside it."""

from __future__ import annotations

import pytest
import torch

from kernels.invariant_attention_ref import KEY_BLOCK, QUERY_TILE, invariant_attention

HEADS, KV_HEADS, DIM = 6, 2, 16
SCALE = DIM ** -0.5
LENGTHS = [300, 37, 129, 5]      # more than two key blocks, one block and a bit, one tile


def random_sequences(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Per sequence of LENGTHS: (q [L, H, D], k [L, KVH, D], v [L, KVH, D])."""
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(n, heads, DIM, generator=gen).to(dtype)
                  for heads in (HEADS, KV_HEADS, KV_HEADS)) for n in LENGTHS]


def paged_cache(seqs, block_size: int, seed: int = 1):
    """The sequences' keys and values in scattered blocks of `block_size`:
    (cache [2 * KVH, num_blocks, block_size, D], one block table per sequence)."""
    counts = [-(-q.shape[0] // block_size) for q, _, _ in seqs]
    order = torch.randperm(sum(counts) + 1, generator=torch.Generator().manual_seed(seed))
    cache = torch.zeros(2 * KV_HEADS, len(order), block_size, DIM, dtype=seqs[0][0].dtype)
    tables, used = [], 0
    for (_, k, v), count in zip(seqs, counts):
        table = order[used:used + count].tolist()
        used += count
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(k.shape[0])])
        cache.view(2 * KV_HEADS, -1, DIM)[:, slots] = torch.cat((k, v), dim=1).transpose(0, 1)
        tables.append(table)
    return cache, tables


def attend(seqs, which: list[int], num_queries: int, block_size: int = 16, upto=None,
           **options) -> torch.Tensor:
    """The last `num_queries` queries (of the first `upto[i]` tokens) of the sequences
    `which`, attended together -> [len(which), num_queries, H, D]."""
    cache, tables = paged_cache(seqs, block_size)
    upto = upto or [seqs[i][0].shape[0] for i in which]
    width = max(len(tables[i]) for i in which)
    padded = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in which])
    q = torch.stack([seqs[i][0][n - num_queries:n] for i, n in zip(which, upto)])
    return invariant_attention(q, cache, padded, torch.tensor(upto), SCALE, **options)


def dense(q, k, v, sinks=None, window=None) -> torch.Tensor:
    """float64 attention of the last Q positions of one sequence: q [Q, H, D], k, v [L, KVH, D]."""
    group = HEADS // KV_HEADS
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))     # [L, H, D]
    scores = torch.einsum("qhd,lhd->hql", q.double(), k) * SCALE
    key_pos = torch.arange(k.shape[0])
    query_pos = k.shape[0] - q.shape[0] + torch.arange(q.shape[0])
    seen = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        seen &= key_pos[None, :] > query_pos[:, None] - window
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        sink = sinks.double()[:, None, None].expand(-1, q.shape[0], 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("hql,lhd->qhd", probs, v)


OPTIONS = {"plain": {}, "sinks": {"sinks": 2 * torch.randn(HEADS)}, "window": {"window": 50},
           "sinks-and-window": {"sinks": torch.randn(HEADS), "window": 7}}


def test_the_tiles_and_blocks_are_exercised():
    assert LENGTHS[0] > 2 * KEY_BLOCK and LENGTHS[0] > 2 * QUERY_TILE


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_decodes_match_dense_attention(dtype, options):
    seqs = random_sequences(dtype)
    opts = OPTIONS[options]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    prefill = attend(seqs, [0], LENGTHS[0], **opts)[0]
    torch.testing.assert_close(prefill.double(), dense(*seqs[0], **opts), atol=tol, rtol=tol)
    decodes = attend(seqs, [0, 1, 2, 3], 1, **opts)
    for i, (q, k, v) in enumerate(seqs):
        torch.testing.assert_close(decodes[i, 0].double(), dense(q[-1:], k, v, **opts)[0],
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_gets_the_same_bits_alone_in_a_group_and_in_a_prefill(dtype, options):
    seqs = random_sequences(dtype)
    opts = OPTIONS[options]
    for i in range(len(seqs)):
        alone = attend(seqs, [i], 1, **opts)[0, 0]
        grouped = attend(seqs, [3, i, 0, 1], 1, **opts)[1, 0]   # padded to 300 keys
        in_prefill = attend(seqs, [i], LENGTHS[i], **opts)[0, -1]
        other_blocks = attend(seqs, [i], 1, block_size=4, **opts)[0, 0]
        assert torch.equal(alone, grouped)
        assert torch.equal(alone, in_prefill)
        assert torch.equal(alone, other_blocks)


@pytest.mark.parametrize("options", ["plain", "sinks-and-window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_gets_the_same_bits_however_it_is_chunked(dtype, options):
    seqs = random_sequences(dtype)
    opts = OPTIONS[options]
    whole = attend(seqs, [0], LENGTHS[0], **opts)[0]
    for cuts in ([1, 130, 300], [127, 128, 300], [3, 7, 299, 300], [200, 300]):
        start, parts = 0, []
        for end in cuts:
            parts.append(attend(seqs, [0], end - start, upto=[end], **opts)[0])
            start = end
        assert torch.equal(torch.cat(parts), whole), cuts
