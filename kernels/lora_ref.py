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
and one scatter-add of whole rows after: the number of ops is fixed per projection,
however many adapters the step mixes (BENCHMARKS.md measures what they cost). Padded
positions of t are zeroed, so they add nothing.

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
    """x: [T, K], lora_a: [S, K, W] -> t: [G, M, W] in x's dtype, where
    t[g, m] = x[rows[g, m]] @ lora_a[slots[g]] for m < lens[g], and zero past them."""
    grouped = x.index_select(0, mapping.rows.flatten())                     # [G * M, K]
    t = torch.bmm(grouped.view(mapping.num_groups, mapping.max_rows, -1), mapping.take(lora_a))
    return t.masked_fill_(mapping.padding, 0) if mapping.padded else t


def lookup(ids: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
    """ids: [T] token ids, lora_a: [S, V, R] (an embedding adapter's A^T) -> t: [G, M, R],
    t[g, m] = lora_a[slots[g], ids[rows[g, m]]] for m < lens[g], and zero past them."""
    t = lora_a[mapping.slots[:, None], ids[mapping.rows]]                  # [G, M, R]
    return t.masked_fill_(mapping.padding, 0) if mapping.padded else t


def expand(t: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, mapping: LoraMapping,
           slices: Slices) -> None:
    """Add each row's delta into y: [T, N]. t: [G, M, len(slices) * R], lora_b: [S, R, N]:
    y[rows[g, m], a:b] += t[g, m, j*R:(j+1)*R] @ lora_b[slots[g], :, a:b] for slice j = (a, b)."""
    rank = lora_b.shape[1]
    b = mapping.take(lora_b)                                                # [G, R, N]
    rows = mapping.rows.flatten()    # padded positions point at row 0 with a zero delta
    deltas = [torch.bmm(t[:, :, j * rank:(j + 1) * rank], b[:, :, start:stop])   # [G, M, n_j]
              for j, (start, stop) in enumerate(slices)]
    if _tile(slices, y.shape[1]):
        # One scatter of whole rows: on the CPU, many times faster than one per slice of columns.
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)   # [G, M, N]
        y.index_add_(0, rows, delta.view(len(rows), -1))
        return
    for delta, (start, stop) in zip(deltas, slices):
        y[:, start:stop].index_add_(0, rows, delta.view(len(rows), -1))


def _tile(slices: Slices, width: int) -> bool:
    """Whether the slices, in order, cover columns [0, width) once each."""
    stops = [0, *(stop for _, stop in slices)]
    return stops[-1] == width and all(start == stops[j] for j, (start, _) in enumerate(slices))
