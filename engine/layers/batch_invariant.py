"""The batch-invariant mode: a token's numbers depend on its own sequence only, bit for bit.

In the default mode a token's result may change in its last bits with its company, for
two reasons measured on the CPU (BENCHMARKS.md, issue 18): oneDNN runs a one-row product
another way than a product of many rows, and a decode's attention goes through another
path than the same position's in a prefill. In this mode every per-token computation is
done in a way that does not look at the batch:

- projections (every `Linear`, the experts of a MoE layer) on the CPU: oneDNN's product
  gives a row the same bits in a call of any number of rows from two on (measured on the
  default model's shapes for counts up to 2,048, BENCHMARKS.md; a one-row product may
  take a matrix-vector path), so a product runs in one call, a one-row call padded to
  `MIN_ROWS` (`padded_rows`). That is the library's behaviour, not a promise, so `enable`
  probes each product shape first (`row_invariant`); a shape whose rows change with
  their company runs in fixed tiles of `ROW_TILE` rows instead (`tiled_rows`: the kernel
  sees one shape whatever the number of tokens, at the cost of reading the weight once a
  tile). On CUDA they go through a Triton matmul with fixed tiles (`cuda_matmul`);
- attention goes query tile by query tile over fixed-size key blocks, in a fixed order,
  in float32, the same for a prefill and a decode and any cache block size
  (kernels/invariant_attention_ref.py; on CUDA its Triton twin, kernels/invariant_attention.py);
- a hybrid model's linear attention runs its recurrent form for every token
  (engine.layers.linear_attention);
- the MoE layer sums each token's experts in a fixed order;
- norms, activations (engine.layers.activation), logits, log-softmax and sampling are
  row by row already.

The mode is read once, at model build: `engine.models.loader.load_model` calls `enable`,
which switches every layer that has it (its class says `batch_invariant = False`) and
picks one call or tiles for each layer with products (its class says `tiled = True`).
What it costs is in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Product = Callable[[torch.Tensor], torch.Tensor]     # rows [n, in] -> [n, out], row by row

# The fewest rows a product is called on: oneDNN runs a one-row product another way.
MIN_ROWS = 2
# The row counts `row_invariant` tries: around each power of two (where a library's
# blocking changes), to a decode batch's usual size.
PROBE_ROWS = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
# Rows per product tile where the probe fails. Larger tiles make a step of many rows
# cheaper (fewer products, each reading the whole weight) and a batch-1 decode dearer (it
# computes a whole tile): 8 kept batch 1 within 1.4x of the default mode (BENCHMARKS.md).
ROW_TILE = 8


def invariant_rows(fn: Product, x: torch.Tensor, tiled: bool) -> torch.Tensor:
    """fn over x [n, ...] the mode's way: in fixed tiles, or in one call of at least
    MIN_ROWS rows where fn was probed row-invariant (`tiled` False)."""
    return tiled_rows(fn, x) if tiled else padded_rows(fn, x)


def padded_rows(fn: Product, x: torch.Tensor, rows: int = MIN_ROWS) -> torch.Tensor:
    """fn over x [n, ...] in one call of at least `rows` rows (padded with zeros)."""
    n = x.shape[0]
    if n == 0 or n >= rows:
        return fn(x)
    return fn(_zero_padded(x, rows))[:n]


def tiled_rows(fn: Product, x: torch.Tensor, tile: int = ROW_TILE) -> torch.Tensor:
    """fn over x [n, ...] in tiles of exactly `tile` rows (the last padded with zeros),
    the outputs' first n rows concatenated. `fn` must treat rows independently."""
    n = x.shape[0]
    if n == 0:
        return fn(x)
    padded = _zero_padded(x, -(-n // tile) * tile)
    parts = [fn(part) for part in padded.split(tile)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[:n] if n % tile else out


def _zero_padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] with zero rows after it up to `rows` (x itself if it has them)."""
    missing = rows - x.shape[0]
    return torch.cat((x, x.new_zeros(missing, *x.shape[1:]))) if missing > 0 else x


def cuda_matmul(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The mode's x @ weight.T + bias on CUDA: a Triton kernel with fixed tiles
    (kernels/invariant_matmul.py), whose row bits do not depend on the number of rows."""
    from kernels.invariant_matmul import matmul  # imports triton, which CUDA machines have

    return matmul(x, weight, bias)


def row_invariant(product: Product, weight: torch.Tensor) -> bool:
    """Whether `product` (by `weight` [out, in]) gives each row the same bits in calls of
    every probed number of rows as in a larger call, its rows first or last in turn."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(PROBE_ROWS) + 7, weight.shape[-1], generator=gen).to(weight)
    with torch.inference_mode():
        whole = product(x)
        parts = [slice(-n, None) if i % 2 else slice(n) for i, n in enumerate(PROBE_ROWS)]
        return all(torch.equal(product(x[rows]), whole[rows]) for rows in parts)


def enable(model: nn.Module) -> None:
    """Put every layer of `model` that has the mode in it (at build, before serving),
    probing each shape of CPU product once."""
    probed: dict[tuple, bool] = {}
    for module in model.modules():
        if hasattr(type(module), "batch_invariant"):
            module.batch_invariant = True
        if hasattr(type(module), "tiled"):
            module.tiled = not all(_probe(product, weight, has_bias, probed)
                                   for product, weight, has_bias in module.products())


def _probe(product: Product, weight: torch.Tensor, has_bias: bool,
           probed: dict[tuple, bool]) -> bool:
    if weight.is_cuda:         # cuda_matmul's tiles are fixed by construction
        return True
    key = (tuple(weight.shape), weight.dtype, has_bias)
    if key not in probed:
        probed[key] = row_invariant(product, weight)
    return probed[key]
