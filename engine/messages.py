"""The typed messages between an engine's caller side (`engine.llm_engine.Engine`) and
its core (`engine.engine_core.EngineCore`), which may run in a process of its own: so
every field pickles, and nothing here holds a tensor or a lock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.text.pipeline import ReasoningOptions, ToolCallOptions

# ---- caller -> core -------------------------------------------------------------------


@dataclass(frozen=True)
class CoreSpec:
    """What a core process builds itself from (its first message)."""

    model_dir: Path
    config: EngineConfig
    progress: bool


@dataclass(frozen=True)
class AddRequest:
    """`len(seeds)` samples of one prompt; sample i's id is `sample_ids[i]`."""

    sample_ids: list[str]
    prompt_ids: list[int]
    params: SamplingParams
    seeds: list[int]                     # one random stream per sample
    checkpoint: Path | None = None       # the resolved checkpoint directory; None: the base
    checkpoint_version: float = 0.0      # when it was completed: a re-saved checkpoint is new
    reasoning: ReasoningOptions | None = None
    tool_calls: ToolCallOptions | None = None


@dataclass(frozen=True)
class AbortRequest:
    sample_id: str


@dataclass(frozen=True)
class Shutdown:
    """Abort every open request and end the loop."""


# ---- core -> caller -------------------------------------------------------------------


@dataclass(frozen=True)
class CoreReady:
    """The core has loaded the model and takes requests."""

    max_model_len: int
    num_kv_blocks: int


@dataclass(frozen=True)
class CoreFailed:
    """The core could not start; `error` is raised in the caller."""

    error: BaseException


@dataclass
class StepOutputs:
    """What one turn of the loop produced, and the engine's state after it."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats | None = None
