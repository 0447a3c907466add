"""The engine: one thread owns the model and runs the loop; callers only enqueue and read streams.

    caller threads ── add_request / abort ──> inbox ──> engine loop (one thread)
                                                         │ scheduler.schedule()
                                                         │ runner.execute()  (model + sampler)
                                                         │ output_processor.process()
    caller threads <── RequestStream (one per request) <─┘

By default the loop runs in a background thread of its own. With `start=False` the
caller runs it instead, with `run()`, which `pokeserve serve` does on the main thread.
On the CPU that is worth a lot: libgomp (PyTorch's OpenMP runtime) lets the worker
threads of a team started by any thread but the process's first one spin only briefly
when there are as many threads as cores, so each of the thousand-odd parallel regions of
a step pays to wake them up. On a 2-core machine a step runs 1.3x (64 sequences) to 1.6x
(one sequence) faster on the main thread; BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import queue
import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from engine.block_manager import BlockManager
from engine.checkpoints.merge import LoraManager
from engine.checkpoints.store import CheckpointStore
from engine.client import SamplingClient
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, cache_capacity
from engine.models.default_model import fetch_default_model
from engine.models.loader import load_model
from engine.models.registry import load_model_config
from engine.outputs import RequestOutput, RequestStream
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.state_slots import StateSlotAllocator
from engine.text.output_processor import OutputProcessor
from engine.text.tokenizer import Tokenizer


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int            # since start
    num_prefix_cached_tokens: int   # since start
    num_free_state_slots: int = 0   # models with linear-attention layers
    num_total_state_slots: int = 0


class Engine:
    def __init__(self, model: str | Path | None = None, *, progress: bool = True,
                 start: bool = True, **options) -> None:
        """`model`: a Hugging Face model directory; None serves the embedded default model.
        `start`: run the loop in a background thread; with False, call `run()` yourself.
        `options` are the fields of EngineConfig (device, dtype, block_size, ...)."""
        self.config = ecfg = EngineConfig(**options)
        self.model_dir = Path(model) if model else fetch_default_model()
        self.model_name = self.model_dir.name
        self.model_config = cfg = load_model_config(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        model = load_model(self.model_dir, cfg, ecfg.device, ecfg.dtype, progress=progress)
        num_blocks, num_state_slots = cache_capacity(cfg, ecfg)
        # A lone sequence of max_model_len tokens always fits in the cache, so preemption
        # always makes progress.
        self.max_model_len = min(ecfg.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings, num_blocks * ecfg.block_size)
        # A cached block cannot restore a linear-attention state: no prefix caching there.
        self.block_manager = BlockManager(num_blocks, ecfg.block_size, ecfg.enable_prefix_caching
                                          and cfg.linear_attention is None)
        self.state_slots = StateSlotAllocator(num_state_slots if cfg.linear_attention else None)
        self.scheduler = Scheduler(self.block_manager, ecfg.max_num_seqs,
                                   ecfg.max_num_batched_tokens, state_slots=self.state_slots)
        self.runner = ModelRunner(model, cfg, ecfg, num_blocks, num_state_slots)
        self.checkpoints = CheckpointStore(ecfg.checkpoint_root, self.model_name, cfg)
        # Exact base copies live in host memory: the KV cache already took the GPU's spare.
        self.lora = LoraManager(model, cache_bytes=ecfg.lora_cache_memory, backup_device="cpu")
        self.output_processor = OutputProcessor(self.tokenizer, cfg.eos_token_ids, self.max_model_len)
        # SimpleQueue: its put() may be called from a signal handler (see shutdown).
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, tuple[Sequence, RequestStream]] = {}
        self._arrivals = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run, name="pokeserve-engine", daemon=True)
            self._thread.start()

    # ---- caller side (any thread) -------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    checkpoint: str | None = None, request_id: str | None = None,
                    sample_index: int = 0) -> RequestStream:
        """Queue a request; raises ValueError at once for a bad prompt or parameters."""
        if not self.is_alive():
            raise RuntimeError("the engine is not running")
        self._validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        seed = (random.getrandbits(63) if params.seed is None else
                xxhash.xxh64_intdigest(f"{params.seed}:{sample_index}".encode()) & (2**63 - 1))
        info = None if checkpoint is None else self.checkpoints.resolve(checkpoint)
        seq = Sequence(request_id, list(prompt_ids), params, seed,
                       checkpoint=info.path if info else None,
                       checkpoint_version=info.created if info else 0.0)
        stream = RequestStream(request_id)
        self._inbox.put(("add", seq, stream))
        return stream

    def is_alive(self) -> bool:
        """Whether the engine takes requests: False after shutdown or once its loop died."""
        return not self._stopped.is_set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        s, bm, slots = self.scheduler, self.block_manager, self.state_slots
        return EngineStats(len(s.running), len(s.waiting), bm.num_free_blocks, bm.num_total_blocks,
                           s.num_preemptions, s.num_prefix_cached_tokens,
                           slots.num_free_slots, slots.num_total_slots)

    def sampling_client(self, checkpoint: str | None = None) -> SamplingClient:
        """A native client for the base model or a checkpoint (checked now: CheckpointError)."""
        if checkpoint is not None:
            self.checkpoints.resolve(checkpoint)
        return SamplingClient(self, checkpoint)

    def shutdown(self) -> None:
        """Abort every open request and end the loop. Waits only for the engine's own
        thread, so a signal handler on the thread that runs the loop may call it."""
        self._stopped.set()
        self._inbox.put(("stop",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {wanted} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens or 1} for the completion). Please reduce the prompt or "
                f"max_tokens.")

    # ---- engine loop ---------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, until `shutdown()`. The thread that calls it owns the model."""
        try:
            while self._drain_inbox(block=not self.scheduler.has_work()):
                batch = self.scheduler.schedule()
                if batch is not None:
                    self._step(batch)
        except BaseException as exc:  # a bug in the engine itself: no caller may hang on it
            for seq, _ in list(self._requests.values()):
                self._fail(seq, exc)
            raise
        finally:
            self._stopped.set()
            self._refuse_late_arrivals()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        for msg in self._queued(block):
            if msg[0] == "stop":
                self._abort_all()
                return False
            if msg[0] == "add":
                self._add(*msg[1:])
            elif msg[0] == "abort" and msg[1] in self._requests:
                self._end(self._requests[msg[1]][0],
                          RequestOutput(msg[1], finished=True, finish_reason="abort"))
        return True

    def _queued(self, block: bool) -> Iterator[tuple]:
        """Queued messages, oldest first, until the inbox is empty; with `block`, waits
        for the first."""
        while True:
            try:
                yield self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False

    def _add(self, seq: Sequence, stream: RequestStream) -> None:
        if seq.request_id in self._requests:
            stream.put(RequestOutput(seq.request_id, finished=True, finish_reason="error",
                                     error=f"request id {seq.request_id!r} is already in use"))
            return
        self._arrivals += 1
        seq.arrival = self._arrivals
        self._requests[seq.request_id] = (seq, stream)
        try:
            self.output_processor.start(seq)
        except Exception as exc:
            self._fail(seq, exc)
            return
        self.scheduler.add(seq)

    def _step(self, batch: ScheduledBatch) -> None:
        try:
            self.lora.activate(batch.checkpoint)
            results = self.runner.execute(batch)
        except Exception as exc:  # a bad checkpoint, a bad request or a bug: fail them, keep serving
            for seq in batch.seqs:
                self._fail(seq, exc)
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq, before)
            try:
                out = self.output_processor.process(seq, results[seq])
            except Exception as exc:
                self._fail(seq, exc)
                continue
            if out is not None and out.finished:
                self._end(seq, out)
            elif out is not None:
                self._requests[seq.request_id][1].put(out)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        self._end(seq, RequestOutput(seq.request_id, finished=True, finish_reason="error",
                                     error=f"{type(exc).__name__}: {exc}"))

    def _end(self, seq: Sequence, out: RequestOutput) -> None:
        self.scheduler.finish(seq)
        _, stream = self._requests.pop(seq.request_id)
        stream.put(out)

    def _refuse_late_arrivals(self) -> None:
        """Answer requests that were queued while the loop was stopping."""
        for msg in self._queued(block=False):
            if msg[0] == "add":
                msg[2].put(RequestOutput(msg[1].request_id, finished=True, finish_reason="abort"))

    def _abort_all(self) -> None:
        for request_id, (seq, _) in list(self._requests.items()):
            self._end(seq, RequestOutput(request_id, finished=True, finish_reason="abort"))
