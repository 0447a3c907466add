"""The engine core: the model and everything that schedules it, driven by one loop.

    inbox (AddRequest, AbortRequest, Shutdown) ──> loop: apply messages
                                                   │ scheduler.schedule()
                                                   │ lora.prepare(), runner.execute()
                                                   │ scheduler.update()   (tokens, token-level ends)
                                                   │ each sample's TextPipeline (text, stop strings,
                                                   │   reasoning split, thinking budget)
    emit(StepOutputs) <── RequestOutputs + stats <─┘

The core knows nothing of where its messages come from: `engine.core_client` runs it
in a thread of the caller's process or on the main thread of a process of its own.
The thread that calls `run` owns the model.

A step's checkpoints are served by `lora.prepare` (engine.checkpoints.lora_serving):
one checkpoint is merged into the weights; several (the scheduler allows up to
`max_loras` adapters, and the base model) run on the unmerged base, each row adding its
own adapter from a slot. A checkpoint that cannot be read fails its own sequences only.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.block_manager import BlockManager
from engine.checkpoints.errors import CheckpointError
from engine.checkpoints.lora_serving import LoraServing
from engine.checkpoints.merge import LoraManager
from engine.config import EngineConfig
from engine.messages import AbortRequest, AddRequest, Shutdown, StepOutputs
from engine.model_runner import ModelRunner, cache_capacity
from engine.models.loader import load_model
from engine.models.registry import load_model_config
from engine.outputs import EngineStats, ErrorKind, RequestOutput
from engine.scheduler import ScheduledBatch, Scheduler, SequenceUpdate
from engine.sequence import Sequence
from engine.state_slots import StateSlotAllocator
from engine.state_snapshots import StateSnapshots
from engine.text.pipeline import TextPipeline
from engine.text.tokenizer import Tokenizer
from kernels import get_lora_ops

Message = AddRequest | AbortRequest | Shutdown


@dataclass(eq=False)
class _Sample:
    """One sample being served: its sequence and its text pipeline."""

    seq: Sequence
    pipeline: TextPipeline


class EngineCore:
    def __init__(self, model_dir: Path, config: EngineConfig, progress: bool = True) -> None:
        self.config = ecfg = config
        cfg = load_model_config(model_dir, ecfg.quantization)
        self.tokenizer = Tokenizer(model_dir)
        model = load_model(model_dir, cfg, ecfg.device, ecfg.dtype, progress=progress,
                           batch_invariant=ecfg.batch_invariant)
        capacity = cache_capacity(cfg, ecfg)
        # A lone sequence of max_model_len tokens always fits in the cache, so preemption
        # always makes progress.
        self.max_model_len = min(ecfg.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings, capacity.num_blocks * ecfg.block_size)
        self.block_manager = BlockManager(capacity.num_blocks, ecfg.block_size,
                                          ecfg.enable_prefix_caching)
        self.state_slots = StateSlotAllocator(capacity.num_state_slots
                                              if cfg.linear_attention else None)
        # The kept states' rows come after the live slots' in the runner's state pool.
        snapshots = (StateSnapshots(capacity.num_state_slots, capacity.num_state_snapshots)
                     if capacity.num_state_snapshots else None)
        # Exact base copies live in host memory: the KV cache already took the GPU's spare.
        merger = LoraManager(model, cache_bytes=ecfg.lora_cache_memory, backup_device="cpu",
                             max_cached=ecfg.max_cpu_loras, max_rank=ecfg.max_lora_rank)
        self.lora = LoraServing(model, merger, ecfg.max_loras,
                                get_lora_ops("auto", ecfg.device), ecfg.lora_mode)
        self.scheduler = Scheduler(self.block_manager, ecfg.max_num_seqs,
                                   ecfg.max_num_batched_tokens, eos_token_ids=cfg.eos_token_ids,
                                   max_model_len=self.max_model_len, max_loras=ecfg.max_loras,
                                   mixable=self.lora.mixable, state_slots=self.state_slots,
                                   state_snapshots=snapshots)
        self.runner = ModelRunner(model, cfg, ecfg, capacity.num_blocks, capacity.num_state_rows)
        self._num_unmerged_steps = 0
        self._samples: dict[str, _Sample] = {}
        self._arrivals = 0
        self._outbox: list[RequestOutput] = []
        self._last_stats: EngineStats | None = None

    def stats(self) -> EngineStats:
        s, bm, slots = self.scheduler, self.block_manager, self.state_slots
        return EngineStats(len(s.running), s.num_waiting, bm.num_free_blocks, bm.num_total_blocks,
                           s.num_preemptions, s.num_prefix_cached_tokens,
                           s.num_computed_prompt_tokens, self._num_unmerged_steps,
                           slots.num_free_slots, slots.num_total_slots)

    def run(self, inbox: queue.SimpleQueue, emit: Callable[[StepOutputs], None]) -> None:
        """The loop, until a Shutdown message. Each turn emits what it produced."""
        try:
            while self._apply(self._drain(inbox, block=not self.scheduler.has_work())):
                batch = self.scheduler.schedule()
                if batch is not None:
                    self._step(batch)
                self._emit(emit)
        except BaseException as exc:  # a bug in the engine itself: no caller may hang on it
            for sample in list(self._samples.values()):
                self._fail(sample.seq, exc)
            raise
        finally:
            self._refuse_late_arrivals(inbox)
            self._emit(emit)

    # ---- messages -----------------------------------------------------------------------

    def _apply(self, messages: Iterator[Message]) -> bool:
        """Apply queued messages; False once asked to stop."""
        for msg in messages:
            if isinstance(msg, Shutdown):
                for sample in list(self._samples.values()):
                    self._end(sample.seq, self._finished(sample.seq, "abort"))
                return False
            if isinstance(msg, AddRequest):
                self._add(msg)
            elif msg.sample_id in self._samples:
                seq = self._samples[msg.sample_id].seq
                self._end(seq, self._finished(seq, "abort"))
        return True

    @staticmethod
    def _drain(inbox: queue.SimpleQueue, block: bool) -> Iterator[Message]:
        """Queued messages, oldest first, until the inbox is empty; with `block`, waits
        for the first."""
        while True:
            try:
                yield inbox.get(block=block)
            except queue.Empty:
                return
            block = False

    def _add(self, msg: AddRequest) -> None:
        seqs = []
        for sample_id, seed in zip(msg.sample_ids, msg.seeds):
            self._arrivals += 1
            seq = Sequence(sample_id, list(msg.prompt_ids), msg.params, seed,
                           checkpoint=msg.checkpoint, checkpoint_version=msg.checkpoint_version,
                           arrival=self._arrivals)
            try:
                pipeline = TextPipeline(self.tokenizer, seq.prompt_ids, msg.params,
                                        msg.reasoning, msg.tool_calls)
            except Exception as exc:
                self._outbox.append(self._error(sample_id, exc))
                continue
            self._samples[sample_id] = _Sample(seq, pipeline)
            self.scheduler.force(seq, pipeline.take_forced_ids())
            seqs.append(seq)
        if seqs:
            self.scheduler.add(seqs[0], seqs[1:])

    def _refuse_late_arrivals(self, inbox: queue.SimpleQueue) -> None:
        """Answer requests that were queued while the loop was stopping."""
        for msg in self._drain(inbox, block=False):
            if isinstance(msg, AddRequest):
                self._outbox += [RequestOutput(i, finished=True, finish_reason="abort")
                                 for i in msg.sample_ids]

    # ---- steps --------------------------------------------------------------------------

    def _step(self, batch: ScheduledBatch) -> None:
        try:
            plan = self.lora.prepare(batch.checkpoints)
            if plan.failed:   # checkpoints that cannot be read: only their sequences fail
                failed = [s for s in batch.seqs if s.checkpoint in plan.failed]
                for seq in failed:
                    self._fail_prompt(seq, plan.failed[seq.checkpoint])
                batch = batch.without(set(failed))
                if not batch.seqs:
                    return
            results = self.runner.execute(batch, plan.slots)
        except Exception as exc:  # a bad request or a bug: fail them, keep serving
            for seq in batch.seqs:
                self._fail_prompt(seq, exc)
            return
        self._num_unmerged_steps += plan.slots is not None
        for update in self.scheduler.update(batch, results):
            try:
                out = self._output(update)
            except Exception as exc:
                self._fail(update.seq, exc)
                continue
            if out.finished:
                self._end(update.seq, out)
            else:
                self._outbox.append(out)

    def _output(self, update: SequenceUpdate) -> RequestOutput:
        """The RequestOutput of one sequence's new token, through its text pipeline."""
        seq, result = update.seq, update.result
        pipeline = self._samples[seq.request_id].pipeline
        delta = pipeline.feed(result.token_id, update.finish_reason)
        self.scheduler.force(seq, pipeline.take_forced_ids())
        out = RequestOutput(seq.request_id, [result.token_id], [result.logprob],
                            [result.top_logprobs] if seq.params.logprobs else None,
                            text=delta.text, reasoning=delta.reasoning, content=delta.content,
                            tool_calls=delta.tool_calls, reasoning_tokens=pipeline.reasoning_tokens,
                            prompt_logprobs=update.prompt_logprobs,
                            prompt_top_logprobs=update.prompt_top_logprobs)
        if len(seq.output_ids) == 1:
            out.num_prompt_tokens, out.num_cached_tokens = (seq.num_prompt_tokens,
                                                            seq.num_cached_tokens)
        if delta.stop_string is not None:
            out.finished, out.finish_reason, out.stop_reason = True, "stop", delta.stop_string
        elif update.finish_reason is not None:
            out.finished, out.finish_reason, out.stop_reason = (True, update.finish_reason,
                                                                update.stop_token)
        return out

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._end(seq, self._error(seq.request_id, exc))

    def _fail_prompt(self, seq: Sequence, exc: BaseException) -> None:
        """Fail `seq` and the other samples of its prompt that wait on it."""
        for follower in list(seq.followers):
            self._fail(follower, exc)
        self._fail(seq, exc)

    @staticmethod
    def _error(sample_id: str, exc: BaseException) -> RequestOutput:
        # A checkpoint found broken only when loaded (NaN factors, say) is the request's
        # problem, told in the checkpoint's own words; anything else is a bug of ours.
        if isinstance(exc, CheckpointError):
            kind, error = ErrorKind.CHECKPOINT, str(exc)
        else:
            kind, error = ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"
        return RequestOutput(sample_id, finished=True, finish_reason="error", error=error,
                             error_kind=kind)

    @staticmethod
    def _finished(seq: Sequence, reason: str) -> RequestOutput:
        return RequestOutput(seq.request_id, finished=True, finish_reason=reason)

    def _end(self, seq: Sequence, out: RequestOutput) -> None:
        """The last output of a sample: its blocks are freed at once."""
        self.scheduler.finish(seq)
        self._samples.pop(seq.request_id, None)
        self._outbox.append(out)

    def _emit(self, emit: Callable[[StepOutputs], None]) -> None:
        """Send the turn's outputs and the stats after it, if anything changed."""
        stats = self.stats()
        if self._outbox or stats != self._last_stats:
            outputs, self._outbox, self._last_stats = self._outbox, [], stats
            emit(StepOutputs(outputs, stats))
