"""The batch-invariant mode's pieces: each gives a row the same bits whatever rows share
its call (its attention: tests/kernels/test_invariant_attention_ref.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from engine.layers import activation
from engine.layers.batch_invariant import (
    MIN_ROWS,
    PROBE_ROWS,
    ROW_TILE,
    enable,
    padded_rows,
    row_invariant,
    tiled_rows,
)
from engine.layers.linear import Linear
from engine.layers.linear_attention import LinearAttentionState
from engine.layers.moe import SparseMoE, softmax_topk
from engine.models.gpt_oss import topk_softmax
from tests.engine.layers.test_linear_attention import HIDDEN, SPEC, layer_pair, step

DTYPES = [torch.float32, torch.bfloat16]


def alone_and_together(fn, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn on each of rows [37, ...] alone, and on all 37 in one call (whole tiles and a
    padded last one)."""
    assert rows.shape[0] == 37
    with torch.inference_mode():
        return torch.cat([fn(row[None]) for row in rows]), fn(rows)


def doubled_in_calls(runner, n: int) -> list[tuple[int, ...]]:
    """The shapes `runner` calls fn on to double x [n, 3], after checking the result."""
    shapes = []

    def double(t):
        shapes.append(tuple(t.shape))
        return 2 * t

    x = torch.randn(n, 3)
    assert torch.equal(runner(double, x), 2 * x)
    return shapes


@pytest.mark.parametrize("n", [0, 1, ROW_TILE - 1, ROW_TILE, 3 * ROW_TILE + 5])
def test_tiled_rows_calls_fn_on_whole_tiles_and_returns_the_rows_asked_for(n):
    shapes = doubled_in_calls(tiled_rows, n)
    assert all(shape == (ROW_TILE, 3) for shape in shapes) if n else shapes == [(0, 3)]


@pytest.mark.parametrize("n", [0, 1, MIN_ROWS, 37])
def test_padded_rows_calls_fn_once_on_at_least_min_rows(n):
    assert doubled_in_calls(padded_rows, n) == [(max(n, MIN_ROWS) if n else 0, 3)]


def test_the_probe_passes_a_row_by_row_product():
    weight = torch.randn(4, 6)
    assert row_invariant(lambda x: x @ weight.T, weight)


@pytest.mark.parametrize("odd_call", [
    lambda x: x * (1.0 + 1e-6 * (x.shape[0] == PROBE_ROWS[-3])),        # one call size
    lambda x: x + 1e-6 * torch.arange(x.shape[0])[:, None],               # place in the call
])
def test_the_probe_fails_a_product_whose_rows_depend_on_their_call(odd_call):
    weight = torch.randn(6, 6)
    assert not row_invariant(lambda x: odd_call(x @ weight.T), weight)


class _Probed(torch.nn.Module):
    tiled = True

    def __init__(self, product, out_features):
        super().__init__()
        self.weight = torch.randn(out_features, 3)      # each shape is probed once
        self.product = product

    def products(self):
        return [(self.product, self.weight, False)]


def test_enable_keeps_tiles_only_for_products_that_fail_the_probe():
    row_by_row = _Probed(lambda x: x @ torch.ones(3, 5), 5)
    mixes_rows = _Probed(lambda x: (x + x.sum(0, keepdim=True)) @ torch.ones(3, 4), 4)
    enable(torch.nn.ModuleList([row_by_row, mixes_rows]))
    assert not row_by_row.tiled and mixes_rows.tiled


# "probed": as `enable` leaves a module, in one call where this machine's product passes
# the probe and in tiles where it fails (both happen: BENCHMARKS.md, issue 18).
MODES = ["tiles", "probed"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_linear_row_has_the_same_bits_alone_and_among_36_others(dtype, mode):
    """K = 1536: the width at which oneDNN's product takes other paths for other numbers
    of rows (float32 at one row on an AMD EPYC; bfloat16 at 5 to 36 on an Intel Xeon with AMX),
    which the row tiles, or the probe's choice, hide from it."""
    torch.manual_seed(0)
    linear = Linear(1536, 576, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.05)
    enable(linear)
    if mode == "tiles":
        linear.tiled = True
    rows = torch.randn(37, 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    alone, together = alone_and_together(linear, rows)
    assert torch.equal(alone, together)


@pytest.mark.parametrize("name", ["sigmoid", "silu", "softplus"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_activations_give_an_element_the_same_bits_wherever_it_sits(name, dtype):
    """A [37, 5] tensor ends in PyTorch's scalar loop, a [1, 5] one is all scalar, a
    [6, 5] one vector and scalar: the invariant forms agree in each, and with PyTorch's
    to float32 rounding."""
    fn = partial(getattr(activation, name), batch_invariant=True)
    gen = torch.Generator().manual_seed(2)
    x = (6 * torch.randn(37, 5, generator=gen)).to(dtype)
    whole = fn(x)
    assert torch.equal(torch.cat([fn(row[None]) for row in x]), whole)
    assert torch.equal(torch.cat([fn(part) for part in x.split(6)]), whole)
    theirs = {"sigmoid": torch.sigmoid, "silu": F.silu, "softplus": F.softplus}[name]
    torch.testing.assert_close(whole.float(), theirs(x.float()).to(dtype).float(),
                               atol=1e-6, rtol=2e-7 if dtype == torch.float32 else 1e-2)


ROUTERS = {"qwen3-moe": partial(softmax_topk, top_k=2, renormalize=True),
           "gpt-oss": partial(topk_softmax, top_k=2)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_moe_token_has_the_same_bits_alone_and_among_36_others(router, dtype, mode):
    """Among others an expert gets more tokens (its products other shapes), and a
    token's k outputs are mixed in a batch of 37."""
    torch.manual_seed(0)
    moe = SparseMoE(576, 8, 1536, ROUTERS[router], router_bias=router == "gpt-oss",
                    expert_bias=router == "gpt-oss")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.05)
    moe = moe.to(dtype)
    enable(moe)
    if mode == "tiles":
        moe.gate.tiled = moe.experts.tiled = True
    rows = torch.randn(37, 576, generator=torch.Generator().manual_seed(3)).to(dtype)
    alone, together = alone_and_together(moe, rows)
    assert torch.equal(alone, together)


def test_enable_switches_every_layer_that_has_the_mode():
    moe = SparseMoE(16, 4, 8, ROUTERS["qwen3-moe"])
    enable(moe)
    assert moe.gate.batch_invariant and moe.experts.batch_invariant
    assert not Linear.batch_invariant      # the classes' default stays off


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_attention_gives_a_sequence_the_same_bits_however_it_is_stepped(dtype):
    """In the mode a prompt prefilled at once, the same prompt cut in three chunks beside
    another sequence's decodes, and its tokens decoded one at a time agree bit for bit;
    and with the default mode's chunked form to float rounding."""
    ours, _ = layer_pair()
    ours = ours.to(dtype)
    gen = torch.Generator().manual_seed(4)
    seq, other = torch.randn(11, HIDDEN, generator=gen).to(dtype), torch.randn(
        8, HIDDEN, generator=gen).to(dtype)

    def pool():
        return LinearAttentionState.allocate(SPEC, num_slots=3, dtype=dtype, device="cpu")

    chunked = step(ours, pool(), [(seq, 0)], computed=[0])[0]
    enable(ours)
    whole = step(ours, pool(), [(seq, 0)], computed=[0])[0]
    p = pool()
    parts = [step(ours, p, [(other[:5], 2), (seq[:3], 0)], computed=[0, 0])[1]]
    parts.append(step(ours, p, [(other[5:6], 2), (seq[3:4], 0)], computed=[5, 3])[1])
    parts.append(step(ours, p, [(other[6:7], 2), (seq[4:], 0)], computed=[6, 4])[1])
    p = pool()
    decoded = [step(ours, p, [(seq[t:t + 1], 0)], computed=[t])[0] for t in range(11)]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.cat(decoded), whole)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(whole, chunked, atol=tol, rtol=tol)
