"""Batch-invariant paged attention in plain PyTorch: a query's output depends on its own
sequence only, bit for bit, the same for a prefill and a decode.

Every query goes through the same float32 operations on tensors of fixed shape, whatever
else is computed beside it:

- queries in tiles of QUERY_TILE tokens x the G heads sharing a kv head (M = QUERY_TILE * G
  rows; a decode's tile is its one token, and copies of it if QUERY_TILE > 1), keys in
  blocks of KEY_BLOCK positions counted from the sequence's start (independent of the
  cache's block size);
- each (tile, key block) pair is one [M, D] @ [D, KEY_BLOCK] product and one
  [M, KEY_BLOCK] @ [KEY_BLOCK, D] product: a batched product of fixed shape gives each
  matrix of the batch the same bits whatever the batch (measured, BENCHMARKS.md), where
  one product over all of a prefill's queries or all of a context's keys does not (the
  CPU kernels pick their path by the number of rows and columns);
- the softmax in two passes: the max over all of a query's keys (exact, in any order),
  then per key block the weights' sum and weighted values, and those summed over the
  blocks in order from the first. Blocks past a query's position (the padding of a
  decode group, a prefill's later blocks) add exact zeros at the end, so it does not
  matter how many there are;
- attention sinks (gpt-oss) join each query's softmax as one more logit without a
  value; a sliding window is one more mask.

Tiles go through in chunks (of at most CHUNK_SCORES scores, and for a prefill a key
block's worth of queries), each chunk over the key blocks its queries reach. The cache layout is
engine.layers.attention's: [2 * kv_heads, num_blocks, block_size, D], the k heads then the
v heads. Slower than SDPA (BENCHMARKS.md): it is the CPU path of the batch-invariant mode,
and the reference of the Triton kernel (kernels/invariant_attention.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_TILE = 1          # tokens per query tile (BENCHMARKS.md: the cheapest for decodes)
KEY_BLOCK = 64          # key positions per block
CHUNK_SCORES = 1 << 22  # scores held at once (16 MiB)


def invariant_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float,
                        sinks: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """q: [S, Q, H, D], the last Q queries of each of S sequences, whose keys and values
    are in the blocks of `block_tables` [S, num_blocks] (padded with any block id) and
    number `context_lens` [S]; sinks: [H] logits; window: a sliding window in tokens.
    -> [S, Q, H, D] in q's dtype."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    kv_heads, group = kv_cache.shape[0] // 2, num_heads // (kv_cache.shape[0] // 2)
    tiles = _query_tiles(q, kv_heads, scale)                     # [KVH, S * nt, M, D]
    positions = _query_positions(context_lens, num_queries, group)             # [S * nt, M]
    k, v = _gathered(kv_cache, block_tables).chunk(2)            # [KVH, S, NB, KB, D] each
    sink = None if sinks is None else (sinks.float().view(kv_heads, 1, group)
                                       .expand(-1, QUERY_TILE, -1).reshape(kv_heads, 1, -1))
    tiles_per_seq = tiles.shape[1] // num_seqs
    out = torch.empty(tiles.shape, device=q.device)               # [KVH, S * nt, M, D]
    # Decodes: as many tiles as CHUNK_SCORES allows; a prefill: a key block's worth of
    # queries at a time, so that each chunk stops at the blocks its queries reach.
    per_tile = kv_heads * k.shape[2] * tiles.shape[2] * KEY_BLOCK
    step = max(1, CHUNK_SCORES // per_tile)
    if tiles_per_seq > 1:
        step = min(step, max(1, KEY_BLOCK // QUERY_TILE))
    for first in range(0, tiles.shape[1], step):
        rows = slice(first, first + step)
        num_blocks = int(positions[rows].max()) // KEY_BLOCK + 1  # the blocks these reach
        seqs = torch.arange(first, min(first + step, tiles.shape[1]), device=q.device)
        seqs = seqs // tiles_per_seq
        out[:, rows] = _attend_tiles(tiles[:, rows], positions[rows],
                                     _per_tile(k, seqs, num_blocks, tiles_per_seq),
                                     _per_tile(v, seqs, num_blocks, tiles_per_seq),
                                     sink, window)
    out = out.view(kv_heads, num_seqs, -1, group, head_dim)[:, :, :num_queries]
    return out.permute(1, 2, 0, 3, 4).reshape(q.shape).to(q.dtype)


def _attend_tiles(tiles: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, sink: torch.Tensor | None,
                  window: int | None) -> torch.Tensor:
    """tiles [KVH, n, M, D]; positions [n, M]; k, v [KVH, n, NB, KB, D] -> [KVH, n, M, D]."""
    num_blocks = k.shape[2]
    scores = _blockwise_bmm(tiles[:, :, None].expand(-1, -1, num_blocks, -1, -1), k,
                            transpose=True)                      # [KVH, n, NB, M, KB]
    key_pos = torch.arange(num_blocks * KEY_BLOCK, device=k.device).view(num_blocks, 1, -1)
    query_pos = positions[:, None, :, None]                      # [n, 1, M, 1]
    hidden = key_pos > query_pos                                 # [n, NB, M, KB]
    if window is not None:
        hidden |= key_pos <= query_pos - window
    scores.masked_fill_(hidden, -torch.inf)
    best = scores.amax(dim=(2, 4))                               # [KVH, n, M]
    if sink is not None:
        best = torch.maximum(best, sink)
    weights = scores.sub_(best[:, :, None, :, None]).exp_()      # [KVH, n, NB, M, KB]
    total = _sum_in_order(weights.sum(-1), dim=2)                # [KVH, n, M]
    if sink is not None:
        total += torch.exp(sink - best)
    acc = _sum_in_order(_blockwise_bmm(weights, v, transpose=False), dim=2)  # [KVH, n, M, D]
    return acc / total[..., None]


def _sum_in_order(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum over `dim`, first entry first: a sequential scan, where torch.sum's order
    would follow the dimension's length (and a decode group's padding sets that length)."""
    return x.cumsum(dim).select(dim, -1)


def _gathered(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each sequence's keys and values in whole key blocks, float32:
    [2 * KVH, S, NB, KEY_BLOCK, D]. The table is padded with block 0 up to whole key
    blocks (those positions are past every query: masked)."""
    heads, _, block_size, head_dim = kv_cache.shape
    num_seqs, num_blocks = block_tables.shape
    per_key_block = KEY_BLOCK // math.gcd(KEY_BLOCK, block_size)   # table entries
    width = -(-num_blocks // per_key_block) * per_key_block
    tables = F.pad(block_tables, (0, width - num_blocks))
    picked = torch.index_select(kv_cache, 1, tables.flatten()).float()  # [2 KVH, S * width, BS, D]
    return picked.view(heads, num_seqs, -1, KEY_BLOCK, head_dim)


def _per_tile(x: torch.Tensor, seqs: torch.Tensor, num_blocks: int,
              tiles_per_seq: int) -> torch.Tensor:
    """The first `num_blocks` key blocks of each tile's sequence: x [KVH, S, NB, KB, D] ->
    [KVH, n, num_blocks, KB, D], a view (decodes: a sequence per tile; a prefill: one
    sequence, its blocks shared by every tile with stride 0)."""
    x = x[:, :, :num_blocks]
    if tiles_per_seq == 1:
        return x[:, int(seqs[0]):int(seqs[-1]) + 1]
    assert x.shape[1] == 1, "a group is decodes or one prefill"
    return x.expand(-1, len(seqs), -1, -1, -1)


def _blockwise_bmm(a: torch.Tensor, b: torch.Tensor, transpose: bool) -> torch.Tensor:
    """a [KVH, n, NB, M, X] @ b [KVH, n, NB, X, Y] (or b [.., Y, X] transposed) ->
    [KVH, n, NB, M, Y], float32. One batched product when b's leading dims hold a copy per
    tile (decodes), else one per (head, block) over the tiles (a prefill's blocks, shared
    by its tiles with stride 0, which no view merges). Either way each matrix reaches the
    kernel in the same layout, rows contiguous (the kernel's path follows the layout, and
    with it the bits), and each matrix's bits are the same whatever the batch."""
    def kernel_b(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2) if transpose else x

    out_cols = b.shape[-2] if transpose else b.shape[-1]
    out = torch.empty(*b.shape[:3], a.shape[-2], out_cols, device=a.device)
    if b.stride(1) != 0 or b.shape[1] == 1:
        torch.bmm(a.reshape(-1, *a.shape[-2:]), kernel_b(b.reshape(-1, *b.shape[-2:])),
                  out=out.view(-1, *out.shape[-2:]))
        return out
    for h in range(b.shape[0]):
        for block in range(b.shape[2]):
            out[h, :, block] = torch.bmm(a[h, :, block], kernel_b(b[h, :, block]))
    return out


def _query_tiles(q: torch.Tensor, kv_heads: int, scale: float) -> torch.Tensor:
    """q [S, Q, H, D] -> scaled float32 tiles [KVH, S * nt, QUERY_TILE * G, D]: rows are
    (token, head of the kv head's group); a last tile that is short repeats its last query."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    num_tiles = -(-num_queries // QUERY_TILE)
    index = torch.arange(num_tiles * QUERY_TILE, device=q.device).clamp(max=num_queries - 1)
    tiles = q.index_select(1, index).float() * scale              # [S, nt * TQ, H, D]
    tiles = tiles.view(num_seqs, num_tiles, QUERY_TILE, kv_heads, num_heads // kv_heads, head_dim)
    return tiles.permute(3, 0, 1, 2, 4, 5).reshape(kv_heads, num_seqs * num_tiles, -1, head_dim)


def _query_positions(context_lens: torch.Tensor, num_queries: int, group: int) -> torch.Tensor:
    """int [S * nt, QUERY_TILE * G]: each tile row's position in its sequence (copies of a
    query have its position)."""
    num_tiles = -(-num_queries // QUERY_TILE)
    index = torch.arange(num_tiles * QUERY_TILE, device=context_lens.device).clamp(
        max=num_queries - 1)
    positions = context_lens[:, None] - num_queries + index                  # [S, nt * TQ]
    return positions.view(-1, QUERY_TILE, 1).expand(-1, -1, group).reshape(-1, QUERY_TILE * group)
