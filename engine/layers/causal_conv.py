"""The short causal depthwise convolution (with SiLU) of linear-attention layers.

Each channel c of token t becomes silu(sum_j weight[c, j] * x[t - K + 1 + j, c]): a
window over the last K inputs of that channel. The K - 1 inputs before a step's first
token are the sequence's *conv state* (zeros before its first token), so a prompt may
be cut anywhere and a decode needs only its own token and that state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor,
                  state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n consecutive tokens of one sequence.

    x: [n, C]; weight: [C, K]; state: [C, K - 1], the inputs before x
    -> output [n, C] and the new state [C, K - 1] (the last K - 1 inputs, old ones too
    when n < K - 1)."""
    window = torch.cat((state.to(x.dtype), x.T), dim=1)                # [C, K - 1 + n]
    out = F.conv1d(window[None], weight[:, None], groups=weight.shape[0])[0]      # [C, n]
    return F.silu(out).T, window[:, window.shape[1] - state.shape[1]:]


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor,
                       states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B sequences.

    x: [B, C]; weight: [C, K]; states: [B, C, K - 1] -> output [B, C], new states [B, C, K - 1]."""
    window = torch.cat((states.to(x.dtype), x[:, :, None]), dim=2)    # [B, C, K]
    return F.silu((window * weight).sum(-1)), window[:, :, 1:]
