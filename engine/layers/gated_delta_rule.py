"""The gated delta rule (Gated DeltaNet, Yang et al. 2024), in plain PyTorch, float32.

Per head, a state S [key_dim, value_dim] is carried from token to token. Token t, with
query q_t, key k_t (both unit length), value v_t, log-decay g_t <= 0 and write strength
beta_t in (0, 1):

    S'  = exp(g_t) * S                          decay the old memory
    d_t = beta_t * (v_t - S'^T k_t)             what the memory gets wrong about v_t
    S   = S' + k_t d_t^T                        correct it (the delta rule)
    o_t = S^T q_t * key_dim ** -0.5

Two forms compute the same thing:
- `recurrent_gated_delta_rule`: the loop above, one token at a time; decodes use it for
  many sequences at once (one token each).
- `chunk_gated_delta_rule`: a prefill chunk of one sequence, `chunk_size` tokens at a
  time. Inside a chunk the corrections d depend on each other only through a lower
  triangular system, solved in one call; the state is read once at the chunk's start
  and written once at its end, so the work is matmuls instead of a loop per token.

Both take the state the sequence had before these tokens and return the state after
them, so a prompt may be cut anywhere and carried on in the next step.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B sequences.

    q, k: [B, H, Dk]; v: [B, H, Dv]; g, beta: [B, H]; state: [B, H, Dk, Dv]
    -> output [B, H, Dv] and the new state [B, H, Dk, Dv], float32."""
    b, h, dk = q.shape
    # Sequences and heads flattened: every product is one batched matmul over B * H.
    q = (q.float() * dk ** -0.5).view(b * h, 1, dk)
    k = k.float().view(b * h, 1, dk)
    state = (state.float() * g.float().exp()[..., None, None]).view(b * h, dk, -1)   # S'
    correction = beta.float()[..., None] * (v.float() - (k @ state).view(b, h, -1))  # d
    state.baddbmm_(k.transpose(1, 2), correction.view(b * h, 1, -1))  # S' + k d^T, in place
    return (q @ state).view(b, h, -1), state.view(b, h, dk, -1)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor, chunk_size: int = CHUNK_SIZE
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """T consecutive tokens of one sequence.

    q, k: [T, H, Dk]; v: [T, H, Dv]; g, beta: [T, H]; state: [H, Dk, Dv] before them
    -> output [T, H, Dv] and the state after them [H, Dk, Dv], float32."""
    # Heads first: every product below is a batched matmul over heads.
    q = q.float().transpose(0, 1) * q.shape[-1] ** -0.5               # [H, T, Dk]
    k, v = k.float().transpose(0, 1), v.float().transpose(0, 1)        # [H, T, Dk], [H, T, Dv]
    g, beta = g.float().T, beta.float().T                              # [H, T]
    state = state.float()
    out = torch.empty_like(v)
    for start in range(0, q.shape[1], chunk_size):
        c = slice(start, start + chunk_size)
        out[:, c], state = _chunk(q[:, c], k[:, c], v[:, c], g[:, c], beta[:, c], state)
    return out.transpose(0, 1), state


def _chunk(q, k, v, g, beta, state):
    """One chunk of n tokens: q, k [H, n, Dk], v [H, n, Dv], g, beta [H, n], state [H, Dk, Dv].

    With gamma_i = g_1 + ... + g_i (the log-decay from the chunk's start to token i),
    unrolling the loop gives d_i = beta_i (v_i - exp(gamma_i) k_i^T S0
    - sum_{j<i} exp(gamma_i - gamma_j) (k_i . k_j) d_j): the triangular system (I + L) d = rhs."""
    n = q.shape[1]
    gamma = g.cumsum(-1)                                               # [H, n]
    # decay[i, j] = exp(gamma_i - gamma_j) for j <= i, else 0 (masked before exp: no overflow)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[:, :, None] - gamma[:, None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]                                       # [H, n, Dk]
    lower = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)             # L: [H, n, n]
    rhs = beta[..., None] * v - (k_beta * gamma.exp()[..., None]) @ state       # [H, n, Dv]
    system = lower + torch.eye(n, device=q.device)
    correction = torch.linalg.solve_triangular(system, rhs, upper=False)         # d: [H, n, Dv]
    # o_i = exp(gamma_i) S0^T q_i + sum_{j<=i} exp(gamma_i - gamma_j) (q_i . k_j) d_j
    out = (q * gamma.exp()[..., None]) @ state + (q @ k.transpose(-1, -2) * decay) @ correction
    # S_n = exp(gamma_n) S0 + sum_j exp(gamma_n - gamma_j) k_j d_j^T
    to_end = (gamma[:, -1:] - gamma).exp()[..., None]                  # [H, n, 1]
    state = state * gamma[:, -1].exp()[:, None, None] + (k * to_end).transpose(-1, -2) @ correction
    return out, state
