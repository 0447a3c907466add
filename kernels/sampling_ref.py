"""Plain-PyTorch reference of the sampling step: what the Triton kernels must compute.

Readable and sort-based on purpose; the Triton kernels (sampling.py, penalties.py,
logprobs.py) are tested against these functions.

Order (vLLM's): penalties and logit bias on the raw logits; then temperature, top-k,
top-p over the renormalised top-k survivors, min-p relative to the most likely token,
then the draw. Logprobs come from the raw logits.

Truncation keeps an *upper set* of the logits (every token whose logit is >= a
threshold), so tokens tied at a boundary are kept or dropped together, whatever order a
sort puts them in:
- top-k keeps logits >= the k-th largest (k <= 0 or k >= V: off);
- top-p keeps the smallest such set whose renormalised mass reaches p (p >= 1: off);
- min-p keeps tokens with prob >= min_p * max prob (min_p = 0: off);
- tokens with logit -inf are never kept. Greedy rows (temperature 0) keep their argmax.

The draw: u = philox_uniform(seed, step) (bit-identical to Triton's tl.rand), then inverse
CDF in vocabulary order: the first token whose cumulative kept weight exceeds u * total.
A row's token is therefore a pure function of its own logits, parameters, seed and step.
A row without any finite logit returns its argmax (index 0).
"""

from __future__ import annotations

import torch

from kernels.philox import philox_uniform


def scaled_weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """exp((x - max) / T) per token, in [0, 1]; the most likely token has weight 1.

    Greedy rows use T = 1 (their weights are unused). Rows without a finite logit get 0.
    """
    x = logits.float()                                            # [B, V]
    row_max = x.amax(dim=-1, keepdim=True)                        # [B, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    temp = torch.where(temperature > 0, temperature.float(), 1.0)[:, None]
    return torch.exp((x - row_max) / temp)


def truncation_mask(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """bool [B, V]: the tokens each row may draw after top-k, top-p and min-p."""
    x = logits.float()                                            # [B, V]
    vocab = x.shape[-1]
    if not ((top_k > 0) & (top_k < vocab)).any() and not (top_p < 1.0).any():
        # Neither top-k nor top-p in the batch: no sort needed (the CPU engine's common case).
        kth = pth = torch.full((x.shape[0], 1), -torch.inf, device=x.device)
        return _finish_mask(x, kth, pth, temperature, min_p)
    desc, _ = x.sort(dim=-1, descending=True)                     # [B, V]
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).long()
    kth = desc.gather(1, (k - 1)[:, None])                        # [B, 1]
    # top-p over the top-k survivors: the first sorted position where the mass reaches p.
    w_sorted = torch.where(desc >= kth, scaled_weights(desc, temperature), 0.0)
    cum = w_sorted.cumsum(dim=-1)                                 # [B, V]
    reached = cum >= top_p.float()[:, None] * cum[:, -1:]
    first = reached.int().argmax(dim=-1, keepdim=True)            # [B, 1]
    p_on = (top_p < 1.0)[:, None] & reached.any(dim=-1, keepdim=True)
    pth = torch.where(p_on, desc.gather(1, first), -torch.inf)    # [B, 1]
    return _finish_mask(x, kth, pth, temperature, min_p)


def _finish_mask(x: torch.Tensor, kth: torch.Tensor, pth: torch.Tensor,
                 temperature: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep logits at or above both thresholds, then apply min-p; greedy rows keep their argmax."""
    keep = (x >= kth) & (x >= pth) & (x > -torch.inf)
    keep &= scaled_weights(x, temperature) >= min_p.float()[:, None]
    greedy = torch.nn.functional.one_hot(x.argmax(dim=-1), x.shape[-1]).bool()
    return torch.where((temperature <= 0)[:, None], greedy, keep)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """int64 [B]: one token per row (see the module docstring for the exact rule)."""
    x = logits.float()                                            # [B, V]
    vocab = x.shape[-1]
    if (temperature <= 0).all():
        return x.argmax(dim=-1)                                   # all greedy: nothing to draw
    keep = truncation_mask(x, temperature, top_k, top_p, min_p)
    w = torch.where(keep, scaled_weights(x, temperature), 0.0)    # [B, V]
    cum = w.cumsum(dim=-1)                                        # [B, V]
    target = philox_uniform(seeds, steps).to(x.device) * cum[:, -1]
    drawn = (cum <= target[:, None]).sum(dim=-1)                  # first index with cum > target
    # Rounding can leave target >= the total: fall back to the last token with weight.
    positions = torch.arange(vocab, device=x.device)
    last = torch.where(w > 0, positions, -1).amax(dim=-1)
    drawn = torch.where(drawn < vocab, drawn, last)
    argmax = x.argmax(dim=-1)
    return torch.where((temperature <= 0) | (last < 0), argmax, drawn)


def _token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """int [B, V]: how often each token occurs per row; ids outside [0, V) are padding."""
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.int32, device=ids.device)
    slots = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts.scatter_add_(1, slots, torch.ones_like(slots, dtype=torch.int32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> None:
    """In place on logits [B, V]: vLLM's repetition, presence and frequency penalties.

    Repetition applies to tokens seen in the prompt or the output (positive logits are
    divided by it, the others multiplied); presence and frequency count output tokens only.
    """
    vocab = logits.shape[-1]
    out_counts = _token_counts(output_ids, vocab)                 # [B, V]
    seen = (_token_counts(prompt_ids, vocab) > 0) | (out_counts > 0)
    rep = repetition.float()[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= frequency.float()[:, None] * out_counts + presence.float()[:, None] * (out_counts > 0)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                     values: torch.Tensor) -> None:
    """In place: logits[rows[i], token_ids[i]] += values[i] (duplicates add up)."""
    logits.index_put_((rows.long(), token_ids.long()), values.to(logits.dtype), accumulate=True)


def logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
             num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of the raw logits: of token_ids [B], and the top num_top alternatives.

    Returns (chosen [B] f32, top ids [B, num_top] int64, top logprobs [B, num_top] f32),
    most likely first, the lower token id first among ties.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)               # [B, V]
    chosen = lp.gather(1, token_ids.long()[:, None]).squeeze(1)
    if num_top == 0:
        empty = lp[:, :0]
        return chosen, empty.long(), empty
    # A stable descending sort keeps tied tokens in id order.
    top_vals, top_ids = lp.sort(dim=-1, descending=True, stable=True)
    return chosen, top_ids[:, :num_top], top_vals[:, :num_top]
