"""The MoE layer against transformers' Qwen3-MoE block, and against a per-token loop."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from engine.layers.moe import SparseMoE, silu_and_mul, softmax_topk

HIDDEN, EXPERTS, WIDTH, TOP_K = 32, 8, 16, 2


def random_moe(router, bias: bool = False, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(HIDDEN, EXPERTS, WIDTH, router, router_bias=bias, expert_bias=bias)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sparse_moe_matches_transformers_qwen3_moe_block(norm_topk_prob, num_tokens):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=EXPERTS,
                         num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob)
    ours = random_moe(partial(softmax_topk, top_k=TOP_K, renormalize=norm_topk_prob))
    theirs = Qwen3MoeSparseMoeBlock(cfg)
    theirs.load_state_dict(ours.state_dict())     # the same names: gate.weight, experts.*
    x = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x[None])[0], atol=1e-5, rtol=1e-5)


def per_token_reference(moe: SparseMoE, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token on its own, each of its experts as a plain biased MLP, in float64."""
    ex, out = moe.experts, torch.zeros(x.shape, dtype=torch.float64)
    for t, row in enumerate(x.double()):
        logits = row @ moe.gate.weight.double().T + moe.gate.bias.double()
        weights, chosen = logits.softmax(-1).topk(top_k)
        for w, e in zip(weights / weights.sum(), chosen):
            gate_up = ex.gate_up_proj[e].double() @ row + ex.gate_up_proj_bias[e].double()
            hidden = silu_and_mul(gate_up)
            out[t] += w * (ex.down_proj[e].double() @ hidden + ex.down_proj_bias[e].double())
    return out


def test_biased_router_and_experts_match_a_per_token_loop():
    moe = random_moe(partial(softmax_topk, top_k=3, renormalize=True), bias=True)
    x = torch.randn(20, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).double(), per_token_reference(moe, x, 3),
                                   atol=1e-5, rtol=1e-5)


def test_tokens_all_routed_to_one_expert_get_its_output():
    # The router's bias sends every token to expert 5 first, expert 2 second.
    moe = random_moe(partial(softmax_topk, top_k=2, renormalize=True), bias=True)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([0, 0, 3.0, 0, 0, 4.0, 0, 0]))
        x = torch.randn(6, HIDDEN)
        w5, w2 = torch.tensor([4.0, 3.0]).softmax(0)
        want = w5 * moe.experts.expert_forward(5, x) + w2 * moe.experts.expert_forward(2, x)
        torch.testing.assert_close(moe(x), want)


def test_softmax_topk_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)
    weights, experts = softmax_topk(logits, top_k=2, renormalize=False)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = softmax_topk(logits, top_k=2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, :2] / probs[:, :2].sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_weights_changed_in_place_are_used_at_once(dtype):
    # LoRA merges write into one expert's slice: the CPU's packed copies must follow.
    moe = random_moe(partial(softmax_topk, top_k=2, renormalize=True)).to(dtype)
    x = torch.randn(16, HIDDEN).to(dtype)
    with torch.inference_mode():
        moe(x)                                             # packs every expert's matrices
        for e in range(EXPERTS):
            moe.experts.down_proj[e].zero_()
        assert moe(x).abs().max() == 0


def test_no_tokens_give_no_rows():
    moe = random_moe(partial(softmax_topk, top_k=2, renormalize=True))
    with torch.inference_mode():
        assert moe(torch.randn(0, HIDDEN)).shape == (0, HIDDEN)
