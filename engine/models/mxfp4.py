"""MXFP4 expert weights, as gpt-oss checkpoints store them, dequantized once at load time.

MXFP4 (the OCP microscaling format) keeps weights in groups of 32 that share one scale:
- each weight is a 4-bit float, e2m1: a sign bit, two exponent bits and one mantissa
  bit, so one of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (`FP4_VALUES`, indexed by the 4 bits);
- each group's scale is a power of two, stored as an 8-bit exponent biased by 127.

A gpt-oss checkpoint holds, for each expert projection `<name>` (`gate_up_proj`,
`down_proj`) of a layer:
- `<name>_blocks`, uint8 [E, out, in / 32, 16]: each group's 32 values, two per byte,
  the low nibble first;
- `<name>_scales`, uint8 [E, out, in / 32]: each group's exponent + 127.
Dequantized, a projection is [E, out, in]; the model holds it input-major, [E, in, out]
(transformers' `gate_up_proj` is [E, hidden, 2 * intermediate]), hence the transpose.

This is transformers' `convert_moe_packed_tensors` (`transformers.integrations.mxfp4`)
step for step, so the weights are bit-identical to what transformers serves. Keeping the
packed form on the GPU with a matmul that reads it is a later step. `Mxfp4Pairs` is what
the loader uses: it meets each projection's two tensors, in either order and in any
shard, and dequantizes them on the model's device.
"""

from __future__ import annotations

import torch

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
SCALE_BIAS = 127
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


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
        weight[e] = _dequantize_expert(blocks[e], scales[e], dtype).T
    return weight


def _dequantize_expert(blocks: torch.Tensor, scales: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """blocks: [out, G, 16], scales: [out, G] -> [out, G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    low, high = (blocks & 0x0F).long(), (blocks >> 4).long()    # [out, G, 16] each
    # Each byte's two values side by side, the low nibble first: [out, G, 16, 2] -> [out, G, 32]
    values = torch.stack((lut[low], lut[high]), dim=-1).flatten(-2)
    exponents = scales.to(torch.int32)[..., None] - SCALE_BIAS   # [out, G, 1]
    # values * 2 ** exponent, exact; written into `dtype` as transformers writes it.
    return torch.ldexp(values, exponents).to(dtype).flatten(-2)
