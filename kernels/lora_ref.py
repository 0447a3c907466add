"""The segmented LoRA product in plain PyTorch: the reference, and the engine's CPU path.

For the rows of adapter slot k, `y += (x @ A_k^T) @ B_k^T` (the scale folded into B),
in two steps as Punica and vLLM split it:

- `shrink`: t = x @ A_k^T for each group of rows, [G, M, W] (`kernels.lora_mapping`
  groups the rows by slot and pads the groups to one length M);
- `expand`: y[rows, slice_j] += t[:, :, j*R:(j+1)*R] @ B_k[slice_j]^T, for each output
  slice j of a fused projection (q/k/v, gate/up), whose adapters are separate.

The stacked factors hold every slot: A^T as `[S, in, W]` (the slices' A^T side by side,
W = slices * R) and B^T as `[S, R, out]`, R being the largest rank held and smaller
ranks zero-padded. Each step is one batched product whatever the number of adapters
(`bmm` over the groups, one per slice for the expand), with a gather of the rows before
and one of the deltas after (`LoraMapping.inverse`: each row's delta, or a zero row):
the number of ops is fixed per projection, however many adapters the step mixes
(BENCHMARKS.md measures what they cost). Padded positions of t are computed from row 0
and never read back.

t is in the factors' dtype, and so is the delta until it is added into y: with float32
factors (the CPU's, `kernels.LoraOps.factor_dtype`) a bfloat16 row is rounded once, after
its delta is added.

`lookup` is the shrink of an embedding adapter (A is applied to one-hot rows, so it is
a lookup of A^T's row by token id). kernels/lora.py holds the Triton kernels with the
same contracts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.lora_mapping import LoraMapping

Slices = Sequence[tuple[int, int]]   # output columns [start, stop) of each slice


def shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
    """x: [T, K], lora_a: [S, K, W] -> t: [G, M, W] in lora_a's dtype, where
    t[g, m] = x[rows[g, m]] @ lora_a[slots[g]] for m < lens[g] (past them: unspecified)."""
    grouped = x.index_select(0, mapping.rows.flatten()).to(lora_a.dtype)    # [G * M, K]
    return torch.bmm(grouped.view(mapping.num_groups, mapping.max_rows, -1), mapping.take(lora_a))


def lookup(ids: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
    """ids: [T] token ids, lora_a: [S, V, R] (an embedding adapter's A^T) -> t: [G, M, R],
    t[g, m] = lora_a[slots[g], ids[rows[g, m]]] for m < lens[g] (past them: unspecified)."""
    return lora_a[mapping.slots[:, None], ids[mapping.rows]]


def expand(t: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, mapping: LoraMapping,
           slices: Slices) -> None:
    """Add each row's delta into y: [T, N]. t: [G, M, len(slices) * R], lora_b: [S, R, N]:
    y[rows[g, m], a:b] += t[g, m, j*R:(j+1)*R] @ lora_b[slots[g], :, a:b] for slice j = (a, b)."""
    num_groups, max_rows = mapping.rows.shape
    rank = lora_b.shape[1]
    b = mapping.take(lora_b)                                                  # [G, R, N]
    # One extra zero row, the delta of the rows in no group (columns of no slice stay zero).
    # Slices may overlap (an adapter of a whole fused projection beside one of its parts).
    delta = t.new_zeros(num_groups * max_rows + 1, y.shape[1])                # [G * M + 1, N]
    grouped = delta[:-1].view(num_groups, max_rows, -1)
    for j, (start, stop) in enumerate(slices):
        t_j = t[:, :, j * rank:(j + 1) * rank]                               # [G, M, R]
        grouped[:, :, start:stop] += torch.bmm(t_j, b[:, :, start:stop])
    y.add_(delta.index_select(0, mapping.inverse))        # in delta's dtype, then rounded once
