"""Logprobs in each endpoint's OpenAI shape.

Completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`,
where each top_logprobs entry holds the top-k alternatives plus the chosen token.
Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
A token's text is its own decoding (a token holding part of a UTF-8 character reads as
U+FFFD, as in vLLM); JSON has no infinity, so -inf is written as -9999.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine.text.tokenizer import Tokenizer

NEG_INF_LOGPROB = -9999.0

TopLogprobs = Sequence[tuple[int, float]]


def finite(logprob: float) -> float:
    return NEG_INF_LOGPROB if math.isinf(logprob) and logprob < 0 else logprob


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list[int], logprobs: list[float | None],
                   tops: Sequence[TopLogprobs | None] | None, text_offset: int) -> dict:
        """One piece of a completion's logprobs; `text_offset` is where its text starts."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        top_logprobs = []
        for k, (token, logprob) in enumerate(zip(tokens, logprobs)):
            top = tops[k] if tops is not None else None
            if logprob is None:   # the first prompt token has no logprob
                top_logprobs.append(None)
                continue
            entry = {self.token_text(t): finite(lp) for t, lp in (top or ())}
            entry.setdefault(token, finite(logprob))
            top_logprobs.append(entry)
        return {"tokens": tokens,
                "token_logprobs": [None if lp is None else finite(lp) for lp in logprobs],
                "top_logprobs": top_logprobs, "text_offset": offsets}

    def chat(self, token_ids: list[int], logprobs: list[float],
             tops: Sequence[TopLogprobs] | None) -> list[dict]:
        """`logprobs.content` entries for these tokens."""
        return [{**self._chat_token(t, lp),
                 "top_logprobs": [self._chat_token(a, alp) for a, alp in
                                  (tops[k] if tops is not None else ())]}
                for k, (t, lp) in enumerate(zip(token_ids, logprobs))]

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": finite(logprob),
                "bytes": list(text.encode("utf-8", errors="replace"))}


def merge_completion_logprobs(parts: list[dict]) -> dict:
    """Concatenate completion logprobs pieces (prompt, then output) into one."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part[key]] for key in keys}
