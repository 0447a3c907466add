"""Batch-invariant paged attention in plain PyTorch: a query's output depends on its own
sequence only, bit for bit, the same for a prefill and a decode.

Every query goes through the same sequence of float32 operations on tensors of fixed
shape, whatever else is computed beside it:

- queries in tiles of QUERY_TILE tokens x the G heads sharing a kv head (M = QUERY_TILE * G
  rows; a decode's tile is its one token and copies of it), keys in blocks of KEY_BLOCK
  positions counted from the sequence's start (independent of the cache's block size);
- each (tile, key block) pair is one [M, D] @ [D, KEY_BLOCK] product and one
  [M, KEY_BLOCK] @ [KEY_BLOCK, D] product: a batched product of fixed shape gives each
  matrix of the batch the same bits whatever the batch (measured, BENCHMARKS.md), where
  one product over all of a prefill's queries or all of a context's keys does not (the
  CPU kernels pick their path by the number of rows and columns);
- the softmax is online over the key blocks, in order from the first: running max,
  rescaled sum and output, as in flash attention. Blocks past a query's position (the
  padding of a decode group, a prefill's later blocks) change nothing: their weights are
  exactly 0 and the rescale exactly 1, so it does not matter how many there are;
- attention sinks (gpt-oss) join each query's softmax after the last block; a sliding
  window is one more mask.

The cache layout is engine.layers.attention's: [2 * kv_heads, num_blocks, block_size, D],
the k heads then the v heads. Slower than SDPA (BENCHMARKS.md): it is the CPU path of the
batch-invariant mode, and the reference of the Triton kernel (kernels/invariant_attention.py).
"""

from __future__ import annotations

import torch

QUERY_TILE = 4     # tokens per query tile
KEY_BLOCK = 128    # key positions per block


def invariant_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float,
                        sinks: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """q: [S, Q, H, D], the last Q queries of each of S sequences, whose keys and values
    are in the blocks of `block_tables` [S, num_blocks] (padded with any block id) and
    number `context_lens` [S]; sinks: [H] logits; window: a sliding window in tokens.
    -> [S, Q, H, D] in q's dtype."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    kv_heads = kv_cache.shape[0] // 2
    k, v = _gathered_keys(kv_cache, block_tables).chunk(2)        # [KVH, S, NB * KB, D] each
    tiles = _query_tiles(q, kv_heads, scale)                     # [KVH, S * nt, M, D]
    positions = _query_positions(context_lens, num_queries, num_heads // kv_heads)  # [S*nt, M]
    num_tiles, rows = tiles.shape[1], tiles.shape[2]
    tiles_per_seq = num_tiles // num_seqs
    best = torch.full((kv_heads, num_tiles, rows), -torch.inf, device=q.device)  # running max
    total = torch.zeros_like(best)                               # running sum of weights
    acc = torch.zeros(kv_heads, num_tiles, rows, head_dim, device=q.device)
    for block in range(k.shape[2] // KEY_BLOCK):
        keys = slice(block * KEY_BLOCK, (block + 1) * KEY_BLOCK)
        visible = _visible(positions, keys, window)              # [S * nt, M, KB]
        for h in range(kv_heads):
            # [S, KB, D] -> one block per tile: a view (decodes: one tile per sequence;
            # a prefill: one sequence, its block seen by every tile with stride 0)
            k_block, v_block = (t[h, :, None, keys].expand(-1, tiles_per_seq, -1, -1)
                                .reshape(num_tiles, KEY_BLOCK, head_dim) for t in (k, v))
            scores = torch.bmm(tiles[h], k_block.transpose(1, 2))           # [S*nt, M, KB]
            scores.masked_fill_(~visible, -torch.inf)
            _online_softmax_step(scores, v_block, best[h], total[h], acc[h])
    if sinks is not None:
        _add_sinks(sinks.float().view(kv_heads, 1, -1), best, total, acc)
    out = acc / total[..., None]                                 # [KVH, S * nt, M, D]
    out = out.view(kv_heads, num_seqs, -1, num_heads // kv_heads, head_dim)[:, :, :num_queries]
    return out.permute(1, 2, 0, 3, 4).reshape(q.shape).to(q.dtype)


def _gathered_keys(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each sequence's keys and values in order, float32, padded with zeros to whole key
    blocks: [2 * KVH, S, NB * KEY_BLOCK, D]."""
    heads, _, block_size, head_dim = kv_cache.shape
    num_seqs, num_blocks = block_tables.shape
    picked = torch.index_select(kv_cache, 1, block_tables.flatten())
    picked = picked.view(heads, num_seqs, num_blocks * block_size, head_dim)
    length = -(-picked.shape[2] // KEY_BLOCK) * KEY_BLOCK
    out = torch.zeros(heads, num_seqs, length, head_dim, device=kv_cache.device)
    out[:, :, :picked.shape[2]] = picked
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


def _visible(positions: torch.Tensor, keys: slice, window: int | None) -> torch.Tensor:
    """bool [S * nt, M, KEY_BLOCK]: which keys of the block each row sees."""
    key_pos = torch.arange(keys.start, keys.stop, device=positions.device)
    seen = key_pos <= positions[..., None]
    if window is not None:
        seen &= key_pos > positions[..., None] - window
    return seen


def _online_softmax_step(scores: torch.Tensor, v_block: torch.Tensor, best: torch.Tensor,
                         total: torch.Tensor, acc: torch.Tensor) -> None:
    """Fold one key block into the running max `best` and sum `total` [n, M] and the
    running output `acc` [n, M, D], in place. scores: [n, M, KB]; v_block: [n, KB, D]."""
    new_best = torch.maximum(best, scores.amax(-1))
    shift = torch.where(new_best == -torch.inf, 0.0, new_best)  # nothing seen yet: weights 0
    weights = torch.exp(scores - shift[..., None])              # [n, M, KB]
    rescale = torch.exp(best - shift)
    total.mul_(rescale).add_(weights.sum(-1))
    acc.mul_(rescale[..., None]).add_(torch.bmm(weights, v_block))
    best.copy_(new_best)


def _add_sinks(sinks: torch.Tensor, best: torch.Tensor, total: torch.Tensor,
               acc: torch.Tensor) -> None:
    """One more logit per head in each softmax, with no value: sinks [KVH, 1, G]; best,
    total [KVH, n, M]; acc [KVH, n, M, D]."""
    rows = best.shape[-1]
    sink = sinks.expand(-1, rows // sinks.shape[-1], -1).reshape(sinks.shape[0], 1, rows)
    new_best = torch.maximum(best, sink)
    rescale = torch.exp(best - new_best)
    total.mul_(rescale).add_(torch.exp(sink - new_best))
    acc.mul_(rescale[..., None])
