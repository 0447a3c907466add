"""MXFP4 expert weights, as gpt-oss checkpoints store them, dequantized once at load time
(unless the model keeps them packed: `EngineConfig.quantization`). The format and its
dequantization are kernels.mxfp4_ref's.

A gpt-oss checkpoint holds, for each expert projection `<name>` (`gate_up_proj`,
`down_proj`) of a layer:
- `<name>_blocks`, uint8 [E, out, in / 32, 16]: each group's 32 values, two per byte,
  the low nibble first;
- `<name>_scales`, uint8 [E, out, in / 32]: each group's exponent + 127.
Dequantized, a projection is [E, out, in]; the model holds it input-major, [E, in, out]
(transformers' `gate_up_proj` is [E, hidden, 2 * intermediate]), hence the transpose.

The dequantization is transformers' `convert_moe_packed_tensors`
(`transformers.integrations.mxfp4`) step for step, so the weights are bit-identical to
what transformers serves. `Mxfp4Pairs` is what the loader uses: it meets each
projection's two tensors, in either order and in any shard, and dequantizes them on the
model's device. An export writes the dequantized
weights under the projection's own name (`dequantized_names`), as the hub's bf16
checkpoints of these models have them.
"""

from __future__ import annotations

import torch

from kernels.mxfp4_ref import dequantize

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


class Mxfp4Pairs:
    """Collects `<name>_blocks` and `<name>_scales` as a checkpoint is read; each complete
    pair comes back as `<name>`, dequantized to `dtype` on `device`."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.dtype, self.device = dtype, device
        self._halves: dict[str, dict[str, torch.Tensor]] = {}    # name -> suffix -> tensor

    @staticmethod
    def is_half(name: str) -> bool:
        return name.endswith((BLOCKS_SUFFIX, SCALES_SUFFIX))

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Take one half; the (name, dequantized weight) once both are in, else None."""
        suffix = BLOCKS_SUFFIX if name.endswith(BLOCKS_SUFFIX) else SCALES_SUFFIX
        base = name.removesuffix(suffix)
        halves = self._halves.setdefault(base, {})
        halves[suffix] = tensor.to(self.device)
        if len(halves) < 2:
            return None
        del self._halves[base]
        return base, dequantize_mxfp4(halves[BLOCKS_SUFFIX], halves[SCALES_SUFFIX], self.dtype)

    @property
    def unpaired(self) -> list[str]:
        """The halves whose other half never came."""
        return sorted(base + suffix for base, halves in self._halves.items() for suffix in halves)


def dequantized_names(names: list[str]) -> list[str]:
    """A checkpoint's tensor names once its MXFP4 pairs are dequantized: `<name>_blocks`
    and `<name>_scales` become `<name>`, where the first of the two stood."""
    out: dict[str, None] = {}   # ordered, each name once
    for name in names:
        out[name.removesuffix(BLOCKS_SUFFIX).removesuffix(SCALES_SUFFIX)
            if Mxfp4Pairs.is_half(name) else name] = None
    return list(out)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks: uint8 [E, out, G, 16], scales: uint8 [E, out, G] -> [E, G * 32, out] in `dtype`.

    One expert at a time, so the temporaries stay the size of one expert's weights."""
    num_experts, out_dim, num_groups, group_bytes = blocks.shape
    if scales.shape != blocks.shape[:-1]:
        raise ValueError(f"MXFP4 scales {list(scales.shape)} do not match blocks "
                         f"{list(blocks.shape)} (expected {list(blocks.shape[:-1])})")
    weight = torch.empty(num_experts, num_groups * group_bytes * 2, out_dim, dtype=dtype,
                         device=blocks.device)
    for e in range(num_experts):
        weight[e] = dequantize(blocks[e], scales[e], dtype).T
    return weight
