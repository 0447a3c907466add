"""The batch-invariant mode: a token's numbers depend on its own sequence only, bit for bit.

In the default mode a token's result may change in its last bits with its company, for
two reasons measured on the CPU (BENCHMARKS.md, issue 18): oneDNN runs a one-row product
another way than a product of many rows, and a decode's attention goes through another
path than the same position's in a prefill. In this mode every per-token computation is
done in a way that does not look at the batch:

- projections (every `Linear`, the experts of a MoE layer) multiply fixed tiles of
  `ROW_TILE` rows, the last one padded with zeros (`tiled_rows`), so the kernel sees one
  shape whatever the number of tokens; a row's output does not depend on the other rows
  of its tile (the product is row by row). On CUDA they go through a Triton matmul with
  fixed tiles instead (`cuda_matmul`);
- attention goes query tile by query tile over fixed-size key blocks, in a fixed order,
  in float32, the same for a prefill and a decode and any cache block size
  (kernels/invariant_attention_ref.py; on CUDA its Triton twin, kernels/invariant_attention.py);
- a hybrid model's linear attention runs its recurrent form for every token
  (engine.layers.linear_attention);
- the MoE layer sums each token's experts in a fixed order;
- norms, activations (engine.layers.activation), logits, log-softmax and sampling are
  row by row already.

The mode is read once, at model build: `engine.models.loader.load_model` calls `enable`,
which switches every layer that has it (its class says `batch_invariant = False`).
What it costs is in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Rows per product tile. Larger tiles make a step of many rows cheaper (fewer products,
# each reading the whole weight) and a batch-1 decode dearer (it computes a whole tile):
# 8 keeps batch 1 within 1.4x of the default mode (BENCHMARKS.md: 16 and 32 measured).
ROW_TILE = 8


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               tile: int = ROW_TILE) -> torch.Tensor:
    """fn over x [n, ...] in tiles of exactly `tile` rows (the last padded with zeros),
    the outputs' first n rows concatenated. `fn` must treat rows independently."""
    n = x.shape[0]
    if n == 0:
        return fn(x)
    if n % tile:
        x = torch.cat((x, x.new_zeros(tile - n % tile, *x.shape[1:])))
    parts = [fn(part) for part in x.split(tile)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[:n] if n % tile else out


def cuda_matmul(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The mode's x @ weight.T + bias on CUDA: a Triton kernel with fixed tiles
    (kernels/invariant_matmul.py), whose row bits do not depend on the number of rows."""
    from kernels.invariant_matmul import matmul  # imports triton, which CUDA machines have

    return matmul(x, weight, bias)


def enable(model: nn.Module) -> None:
    """Put every layer of `model` that has the mode in it (at build, before serving)."""
    for module in model.modules():
        if hasattr(type(module), "batch_invariant"):
            module.batch_invariant = True
