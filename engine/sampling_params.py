"""Per-request sampling parameters.

`SamplingParams` mirrors the native sampling API's field names (checkpoints.md) and
adds the OpenAI knobs the HTTP layer passes through. `stop=None` keeps the implicit
EOS stop; `stop=[]` disables every stop, EOS included.

`validate` holds the ranges, those of the OpenAI reference and vLLM: every number
finite, temperature in [0, 2], the seed an int64, top_k an int32 (the sampler's
tensors). Token ids are the engine's to check: only it knows the vocabulary.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field

_INT32_END, _INT64_END = 2**31, 2**63


@dataclass
class SamplingParams:
    max_tokens: int | None = None           # None: until a stop or the context end
    temperature: float = 1.0                # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                         # -1 or 0 = off
    stop: str | list[str] | list[int] | None = None
    seed: int | None = None
    min_p: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int = 0                       # top alternatives per sampled token (0..20)
    prompt_logprobs: int | None = None      # None: none; k >= 0: chosen + top-k per prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        if isinstance(self.stop, str):
            return [self.stop]
        return [s for s in (self.stop or []) if isinstance(s, str)]

    @property
    def stop_token_set(self) -> set[int]:
        ids = set(self.stop_token_ids)
        if isinstance(self.stop, list):
            ids.update(s for s in self.stop if isinstance(s, int))
        return ids

    @property
    def eos_stops(self) -> bool:
        """Whether the model's EOS token ends the sequence."""
        return not self.ignore_eos and not (isinstance(self.stop, list) and len(self.stop) == 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {reprlib.repr(getattr(self, name))}")

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:   # NaN fails every comparison
            bad("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k < _INT32_END:
            bad("top_k", f"must be -1, 0 (off) or positive, below {_INT32_END}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            bad("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and not -_INT64_END <= self.seed < _INT64_END:
            bad("seed", "must be a 64-bit integer")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be at most max_tokens ({self.max_tokens})")
        if not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be in [0, 20]")
        if isinstance(self.stop, list) and self.stop:
            kinds = {type(s) for s in self.stop}
            if len(kinds) > 1 or kinds - {str, int}:
                bad("stop", "must be a string, a list of strings or a list of token ids (not mixed)")
            if str in kinds and "" in self.stop:
                bad("stop", "must not contain an empty string")
        elif self.stop is not None and not isinstance(self.stop, (str, list)):
            bad("stop", "must be a string, a list of strings or a list of token ids")
        if self.stop == "":
            bad("stop", "must not be an empty string")
        if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            bad("logit_bias", "values must be in [-100, 100]")
