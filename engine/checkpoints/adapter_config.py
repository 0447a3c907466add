"""What an adapter's `adapter_config.json` says, and the per-module rank and scale it implies.

PEFT's fields that matter for a merge: `r`, `lora_alpha`, `use_rslora` (scale
`alpha / sqrt(r)` instead of `alpha / r`), `rank_pattern` / `alpha_pattern` (per-module
overrides), `target_modules`, `base_model_name_or_path`. Variants we cannot merge
(DoRA, LoRA biases, full `modules_to_save` weights) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoints.errors import CheckpointInvalid

CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of `adapter_config.json` that decide the merge."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    base_model: str | None

    @classmethod
    def from_dir(cls, adapter_dir: Path) -> "AdapterConfig":
        try:
            return cls.from_json((adapter_dir / CONFIG_FILE).read_bytes())
        except FileNotFoundError:
            raise CheckpointInvalid(f"{CONFIG_FILE} is missing") from None
        except OSError as e:
            raise CheckpointInvalid(f"{CONFIG_FILE} is not readable: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "AdapterConfig":
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointInvalid(f"{CONFIG_FILE} is not readable JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointInvalid(f"{CONFIG_FILE} must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "AdapterConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointInvalid(f"peft_type {raw['peft_type']!r} is not LoRA")
        for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
            if raw.get(flag):
                raise CheckpointInvalid(f"{flag}=true adapters are not supported")
        if raw.get("modules_to_save"):
            raise CheckpointInvalid("modules_to_save (full replacement weights) is not supported")
        r, alpha = raw.get("r"), raw.get("lora_alpha")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise CheckpointInvalid(f"r must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise CheckpointInvalid(f"lora_alpha must be a number, got {alpha!r}")
        targets = raw.get("target_modules")
        return cls(r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora")),
                   rank_pattern=dict(raw.get("rank_pattern") or {}),
                   alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                   target_modules=targets, base_model=raw.get("base_model_name_or_path"))

    def scale(self, module: str, rank: int) -> float:
        """The merge scale of `module` (its name in the adapter), whose factors have `rank` rows."""
        expected = _pattern_value(self.rank_pattern, module, self.r)
        if rank != expected:
            raise CheckpointInvalid(f"{module}: factors have rank {rank} but the config says r={expected}")
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the end
    # of the module name, at a dot boundary, as a regular expression.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
