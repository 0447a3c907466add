"""Mixture-of-experts feed-forward: a router picks k experts per token, each a gated MLP.

`SparseMoE(x)` is the definition written out: the router scores every expert, keeps the
top k per token with their weights, the (token, expert) pairs are grouped by expert,
each expert that received tokens runs one gate/up product, the activation and one down
product over all of its tokens at once, and every token gets back the weighted sum of
its k experts' outputs. It is the reference a fused kernel would be tested against.

The three pieces that differ between families are separate and named, so that a family
composes its own layer from them:
- the routing (`softmax_topk`; gpt-oss takes the softmax over the chosen top-k logits),
  a function `router logits [T, E] -> (weights [T, k] float32, expert ids [T, k])`;
- the activation (`silu_and_mul`; gpt-oss clamps a SwiGLU over interleaved gate/up
  columns), a function `(gate_up [n, 2 * I], batch_invariant) -> [n, I]`
  (engine.layers.activation);
- biases on the router and on the experts (gpt-oss has both; the Qwen3 families none).
A shared expert (Qwen3.5-MoE) is a dense MLP added beside this layer by the family.

Expert weights are fused into two 3-D tensors, laid out as transformers holds them:
`gate_up_proj` [E, 2 * I, H] (each expert's gate rows, then its up rows) and `down_proj`
[E, H, I]. Expert e's slice of each is an ordinary `[out, in]` linear weight, so a hub
checkpoint's per-expert tensors copy straight into their rows, a LoRA delta `B @ A`
([out, in]) adds to a slice without a transpose, and one expert's product reads one
contiguous block of memory. With `mxfp4` the experts keep a gpt-oss checkpoint's MXFP4
instead, `<proj>_blocks` [E, out, in / 32, 16] and `<proj>_scales` [E, out, in / 32]
(kernels.mxfp4_ref): on CUDA a Triton kernel reads them packed (kernels/mxfp4.py),
elsewhere each expert's matrix is dequantized for the product a step gives it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import LoraTarget
from engine.layers.activation import silu
from engine.layers.batch_invariant import Product, cuda_matmul, invariant_rows
from engine.layers.linear import Linear, PackedWeight, onednn_linear, uses_onednn
from kernels import mxfp4_ref
from kernels.lora_mapping import LoraMapping

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Activation = Callable[[torch.Tensor, bool], torch.Tensor]

# `<prefix>.experts.<e>.<proj>.weight` (one expert, the hub's layout) or
# `<prefix>.experts.<proj>.weight` (every expert at once: the 3-D LoRA targets).
_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.experts)\.(?:(?P<expert>\d+)\.)?"
                            r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def softmax_topk(logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE's router (also Mixtral's, and Qwen3.5-MoE's with `renormalize` always on).

    logits: [T, E] -> weights [T, k] float32 and expert ids [T, k]: the softmax over all
    experts, in float32, of the k most probable, rescaled to sum to 1 if `renormalize`."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)                # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)                       # [T, k] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def silu_and_mul(gate_up: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """SwiGLU over the concatenated layout: gate_up [n, 2 * I] (gate, then up) -> [n, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return silu(gate, batch_invariant) * up


def expert_param_slice(name: str, intermediate_size: int) -> tuple[str, tuple] | None:
    """Where a per-expert Hugging Face weight lands in `FusedExperts`' tensors.

    `<p>.experts.5.up_proj.weight` -> (`<p>.experts.gate_up_proj`, expert 5's up rows);
    `<p>.experts.up_proj.weight` -> the same rows of every expert (a 3-D LoRA target).
    None for any other name."""
    match = _EXPERT_WEIGHT.match(name)
    if not match:
        return None
    expert = slice(None) if match["expert"] is None else int(match["expert"])
    i = intermediate_size
    fused, rows = {"gate_proj": ("gate_up_proj", slice(0, i)),
                   "up_proj": ("gate_up_proj", slice(i, 2 * i)),
                   "down_proj": ("down_proj", slice(None))}[match["proj"]]
    return f"{match['prefix']}.{fused}", (expert, rows)


def expert_lora_targets(hidden_size: int, intermediate_size: int,
                        num_experts: int) -> dict[str, LoraTarget]:
    """The 3-D LoRA targets of `FusedExperts`, named as `expert_param_slice` reads them."""
    h, i, e = hidden_size, intermediate_size, num_experts
    return {"experts.gate_proj": LoraTarget(i, h, e), "experts.up_proj": LoraTarget(i, h, e),
            "experts.down_proj": LoraTarget(h, i, e)}


class FusedExperts(nn.Module):
    """E gated MLPs of width I over hidden size H, their weights fused per projection.

    In the batch-invariant mode (engine.layers.batch_invariant) each expert runs on the
    CPU over at least two of its tokens, or over fixed tiles of them where the probe at
    `enable` found the experts' products not row-invariant (how many tokens an expert gets
    depends on the batch), and through the fixed-tile Triton matmul on CUDA."""

    batch_invariant = False     # set by engine.layers.batch_invariant.enable
    tiled = True                # the mode's CPU products in tiles (ditto)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: Activation = silu_and_mul, bias: bool = False,
                 mxfp4: bool = False) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.activation, self.mxfp4 = activation, mxfp4
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, (out_dim, in_dim) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
            if mxfp4:   # uint8: the model's cast to its dtype leaves them as they are
                blocks = torch.empty(e, out_dim, in_dim // 32, 16, dtype=torch.uint8)
                scales = torch.empty(e, out_dim, in_dim // 32, dtype=torch.uint8)
                setattr(self, name + "_blocks", nn.Parameter(blocks, requires_grad=False))
                setattr(self, name + "_scales", nn.Parameter(scales, requires_grad=False))
            else:       # [E, 2I, H] and [E, H, I]
                setattr(self, name, nn.Parameter(torch.empty(e, out_dim, in_dim)))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(e, h)) if bias else None
        self._packed = {"gate_up_proj": PackedWeight(), "down_proj": PackedWeight()}

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights, experts: [T, k] (token t goes to experts[t, j] with
        weights[t, j]) -> [T, H]."""
        num_tokens, top_k = experts.shape
        # Group the T * k (token, choice) pairs by expert: pair p = t * k + j.
        order = experts.flatten().argsort(stable=True)                 # [T*k] pairs by expert
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts).tolist()
        grouped = x.index_select(0, order // top_k)                    # [T*k, H] their tokens
        out = torch.empty_like(grouped)                                # [T*k, H]
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                run = partial(self.expert_forward, expert)
                if self.batch_invariant and not x.is_cuda:   # (CUDA: cuda_matmul)
                    out[rows] = invariant_rows(run, grouped[rows], self.tiled)
                else:
                    out[rows] = run(grouped[rows])
                start += count
        # Back to (token, choice) order, then each token's weighted sum over its k choices.
        # A sum in a fixed order rather than index_add_: atomics on CUDA would make the
        # result differ from run to run. (A gather by the inverse permutation: on the CPU
        # index_select is 8x faster than the equivalent index_copy_ scatter.)
        unsorted = out.index_select(0, order.argsort()).view(num_tokens, top_k, x.shape[-1])
        return _weighted_sum(weights, unsorted).to(x.dtype)             # [T, k, H] -> [T, H]

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert over its n tokens: x [n, H] -> [n, H]."""
        gate_up = self._product(x, "gate_up_proj", expert)                  # [n, 2I]
        hidden = self.activation(gate_up, self.batch_invariant)             # [n, I]
        return self._product(hidden, "down_proj", expert)                   # [n, H]

    def products(self) -> list[tuple[Product, torch.Tensor, bool]]:
        """Expert 0's two products, their weights and whether they add a bias, for the
        mode's probe (every expert has the same shapes)."""
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())
        return [(partial(self._product, name=name, expert=0), self.weight(name, 0, dtype),
                 getattr(self, name + "_bias") is not None)
                for name in ("gate_up_proj", "down_proj")]

    def weight(self, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s matrix [out, in] of the projection `name` (dequantized into
        `dtype` if the experts are MXFP4; else as held)."""
        if self.mxfp4:
            return mxfp4_ref.dequantize(getattr(self, name + "_blocks")[expert],
                                        getattr(self, name + "_scales")[expert], dtype)
        return getattr(self, name)[expert]

    def _product(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x @ W[expert].T + b[expert] for the projection `name`; on the CPU through
        oneDNN with each expert's matrix packed once, as engine.layers.linear does."""
        bias = getattr(self, name + "_bias")
        bias = None if bias is None else bias[expert]
        if self.mxfp4:
            return self._mxfp4_product(x, name, expert, bias)
        weight = getattr(self, name)
        if self.batch_invariant and x.is_cuda:
            return cuda_matmul(x, weight[expert], bias)
        if uses_onednn(x):
            return onednn_linear(x, self._packed[name](weight)[expert], bias)
        return F.linear(x, weight[expert], bias)

    def _mxfp4_product(self, x: torch.Tensor, name: str, expert: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """The product with the expert's MXFP4 matrix as it is held: on CUDA the Triton
        kernel reads it packed (its tiles fixed, so the batch-invariant mode's too); the
        reference elsewhere dequantizes it for this product alone."""
        blocks = getattr(self, name + "_blocks")[expert]
        scales = getattr(self, name + "_scales")[expert]
        if x.is_cuda:
            from kernels.mxfp4 import mxfp4_linear  # imports triton, which CUDA machines have
            return mxfp4_linear(x, blocks, scales, bias)
        return mxfp4_ref.mxfp4_linear(x, blocks, scales, bias)


def _weighted_sum(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * outputs[:, j] in float32, choice 0 first: weights [T, k],
    outputs [T, k, H] -> [T, H]. Written out (k is at most a few), so the order is fixed
    whatever the number of tokens, where a batched product's would be the kernel's."""
    total = weights[:, :1] * outputs[:, 0].float()
    for j in range(1, weights.shape[1]):
        total += weights[:, j:j + 1] * outputs[:, j].float()
    return total


class SparseMoE(nn.Module):
    """The router (`gate`, a linear layer H -> E) and the experts, as one feed-forward block."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int,
                 router: Router, activation: Activation = silu_and_mul,
                 router_bias: bool = False, expert_bias: bool = False,
                 mxfp4: bool = False) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)
        self.router = router
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, activation,
                                    expert_bias, mxfp4)

    def forward(self, x: torch.Tensor, lora: LoraMapping | None = None) -> torch.Tensor:
        """x: [T, H] -> [T, H]. `lora` reaches the router only: checkpoints that adapt the
        experts are served merged, never in a step that mixes checkpoints."""
        weights, experts = self.router(self.gate(x, lora))              # [T, k] each
        return self.experts(x, weights, experts)
