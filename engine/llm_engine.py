"""The engine as callers see it: validate and queue requests, stream their outputs back.

    caller threads ── add_request / abort ──> core (engine.engine_core, see core_client)
    caller threads <── RequestStream (one per sample) <── StepOutputs, dispatched here

What stays on the caller's side: the tokenizer, the model's config, the checkpoint
store (it holds no state), request validation (so a bad request raises at once) and
the latest `stats()` the core reported. The model, the KV cache, the scheduler and the
LoRA merges live in the core, by default in a process of its own (`core="process"`);
`core="thread"` keeps it in this process, in a background thread, and `core="inline"`
too, for the caller to run with `run()` on a thread of its choice. In both in-process
modes `engine.core` is the EngineCore itself, for tests and benchmarks of its parts.
"""

from __future__ import annotations

import os
import random
import threading
import uuid
import weakref
from pathlib import Path

import xxhash

from engine.checkpoints.store import CheckpointInfo, CheckpointStore
from engine.client import SamplingClient
from engine.config import EngineConfig
from engine.core_client import ProcessCore, ThreadCore
from engine.messages import AbortRequest, AddRequest, CoreSpec, StepOutputs
from engine.models.default_model import fetch_default_model
from engine.models.registry import load_model_config
from engine.outputs import EngineStats, ErrorKind, RequestOutput, RequestStream
from engine.sampling_params import SamplingParams
from engine.text.pipeline import ReasoningOptions, ToolCallOptions
from engine.text.tokenizer import Tokenizer

CORE_MODES = ("process", "thread", "inline")
# Where the core runs when the caller does not say: "process" unless this variable says
# otherwise (the test suite runs most engines in a thread: a process costs seconds to start).
CORE_ENV_VAR = "POKESERVE_ENGINE_CORE"


class Engine:
    def __init__(self, model: str | Path | None = None, *, core: str | None = None,
                 progress: bool = True, **options) -> None:
        """`model`: a Hugging Face model directory; None serves the embedded default model.
        `core`: where the engine core runs (see the module docstring; default "process").
        `options` are the fields of EngineConfig (device, dtype, block_size, ...)."""
        core = core or os.environ.get(CORE_ENV_VAR) or "process"
        if core not in CORE_MODES:
            raise ValueError(f"core must be one of {CORE_MODES}, got {core!r}")
        self.config = EngineConfig(**options)
        self.model_dir = Path(model).resolve() if model else fetch_default_model()
        self.model_name = self.model_dir.name
        self.model_config = cfg = load_model_config(self.model_dir, self.config.quantization)
        self.tokenizer = Tokenizer(self.model_dir)
        self.checkpoints = CheckpointStore(self.config.checkpoint_root, self.model_name, cfg,
                                           max_lora_rank=self.config.max_lora_rank)
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()      # guards _streams and _alive
        self._alive = True
        spec = CoreSpec(self.model_dir, self.config, progress)
        if core == "process":
            self._core = ProcessCore(spec, self._dispatch, self._core_exited)
            self.core = None
        else:
            self._core = ThreadCore(spec, self._dispatch, self._core_exited, start=core == "thread")
            self.core = self._core.core
        self.max_model_len = self._core.ready.max_model_len
        total = self._core.ready.num_kv_blocks
        self._stats = EngineStats(0, 0, total, total, 0, 0, 0)
        # The core goes when the engine does, even if nobody called shutdown().
        self._finalizer = weakref.finalize(self, self._core.close)

    # ---- requests (any thread) ----------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *,
                    num_samples: int = 1, request_id: str | None = None,
                    checkpoint: CheckpointInfo | None = None,
                    reasoning: ReasoningOptions | None = None,
                    tool_calls: ToolCallOptions | None = None) -> list[RequestStream]:
        """Queue `num_samples` samples of one prompt, one stream each; sample i of request
        R is `R-i`. `checkpoint` is resolved already (`self.checkpoints.resolve`); None
        serves the base model. Raises ValueError at once for a bad prompt or parameters."""
        self._validate(prompt_ids, params, num_samples)
        request_id = request_id or uuid.uuid4().hex
        streams = [RequestStream(f"{request_id}-{i}") for i in range(num_samples)]
        msg = AddRequest([s.request_id for s in streams], list(prompt_ids), params,
                         [_sample_seed(params.seed, i) for i in range(num_samples)],
                         checkpoint.path if checkpoint else None,
                         checkpoint.created if checkpoint else 0.0, reasoning, tool_calls)
        with self._lock:
            if not self._alive:
                raise RuntimeError("the engine is not running")
            taken = [s for s in streams if s.request_id in self._streams]
            if taken:
                for stream in streams:
                    stream.put(RequestOutput(stream.request_id, finished=True,
                                             finish_reason="error", error=f"request id "
                                             f"{taken[0].request_id!r} is already in use",
                                             error_kind=ErrorKind.INTERNAL))
                return streams
            self._streams.update((s.request_id, s) for s in streams)
            self._core.send(msg)
        return streams

    def abort(self, sample_id: str) -> None:
        with self._lock:
            if self._alive and sample_id in self._streams:
                self._core.send(AbortRequest(sample_id))

    def sampling_client(self, checkpoint: str | None = None) -> SamplingClient:
        """A native client for the base model or a checkpoint (checked now: CheckpointError)."""
        if checkpoint is not None:
            self.checkpoints.resolve(checkpoint)
        return SamplingClient(self, checkpoint)

    def stats(self) -> EngineStats:
        """The engine's state as the core last reported it (after its latest turn)."""
        return self._stats

    def is_alive(self) -> bool:
        """Whether the engine takes requests: False after shutdown or once its core died."""
        return self._alive

    def run(self) -> None:
        """With `core="inline"`: run the core's loop on this thread until `shutdown()`."""
        if not isinstance(self._core, ThreadCore) or self._core.started:
            raise RuntimeError('run() is for an engine made with core="inline"')
        self._core.run()

    def shutdown(self) -> None:
        """Abort every open request and stop the core. Waits for it, unless the core's loop
        runs on the calling thread (a signal handler of an inline engine may call it)."""
        self._alive = False    # no lock: a signal handler may have interrupted its holder
        self._core.close()

    # ---- core -> callers ----------------------------------------------------------------

    def _dispatch(self, step: StepOutputs) -> None:
        """Route a turn's outputs to their streams, the stats first, so that a caller who
        got a final output reads stats that count its blocks as free."""
        self._stats = step.stats or self._stats
        for out in step.outputs:
            with self._lock:
                stream = (self._streams.pop(out.request_id, None) if out.finished
                          else self._streams.get(out.request_id))
            if stream is not None:
                stream.put(out)

    def _core_exited(self, reason: str | None) -> None:
        """The core's loop ended: fail whatever is still open, accept nothing more."""
        with self._lock:
            self._alive = False
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(RequestOutput(stream.request_id, finished=True, finish_reason="error",
                                     error=reason or "the engine has shut down",
                                     error_kind=ErrorKind.INTERNAL))

    def _validate(self, prompt_ids: list[int], params: SamplingParams, num_samples: int) -> None:
        params.validate()
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        # Ids past the vocabulary would index past the logits row and fail the whole batch.
        for name, ids in (("logit_bias keys", params.logit_bias),
                          ("stop_token_ids", params.stop_token_set)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} must be token ids in [0, {vocab})")
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {wanted} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens or 1} for the completion). Please reduce the prompt or "
                f"max_tokens.")


def _sample_seed(seed: int | None, sample_index: int) -> int:
    """Sample i's own random stream: from the request's seed and i, else at random."""
    if seed is None:
        return random.getrandbits(63)
    return xxhash.xxh64_intdigest(f"{seed}:{sample_index}".encode()) & (2**63 - 1)
