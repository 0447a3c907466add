"""The native token-level sampling client, with the field names users know (checkpoints.md).

    client = engine.sampling_client("tinker://RUN/sampler_weights/000080")
    resp = client.sample(ModelInput.from_ints(ids), num_samples=2,
                         sampling_params=SamplingParams(max_tokens=32)).result()
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from engine.checkpoints.errors import CheckpointInvalid
from engine.outputs import ErrorKind, RequestStream, TopLogprobs
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import Engine

# Threads that only wait on request streams; the engine thread does the work.
_collectors = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pokeserve-collect")


@dataclass(frozen=True)
class ModelInput:
    tokens: tuple[int, ...]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> "ModelInput":
        return cls(tuple(int(t) for t in tokens))

    def to_ints(self) -> list[int]:
        return list(self.tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class SampledSequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"          # "stop" | "length"


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[TopLogprobs | None] | None = None


class SamplingClient:
    def __init__(self, engine: "Engine", checkpoint: str | None = None) -> None:
        self.engine = engine
        self.checkpoint = checkpoint

    def sample(self, prompt: ModelInput, num_samples: int = 1,
               sampling_params: SamplingParams | None = None,
               include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0) -> Future[SampleResponse]:
        """Queue `num_samples` samples of `prompt`, which share its one prefill; raises
        ValueError at once for bad input (CheckpointError if the checkpoint went bad)."""
        params = sampling_params or SamplingParams()
        if include_prompt_logprobs or topk_prompt_logprobs:
            params = replace(params, prompt_logprobs=topk_prompt_logprobs)
        # Resolved once per call: a checkpoint re-saved since the last call is served anew.
        info = self.engine.checkpoints.resolve(self.checkpoint) if self.checkpoint else None
        streams = self.engine.add_request(prompt.to_ints(), params, num_samples=num_samples,
                                          checkpoint=info)
        return _collectors.submit(_collect, streams, topk_prompt_logprobs > 0)

    async def sample_async(self, *args, **kwargs) -> SampleResponse:
        return await asyncio.wrap_future(self.sample(*args, **kwargs))

    def compute_logprobs(self, prompt: ModelInput) -> Future[list[float | None]]:
        """Logprob of each prompt token given the ones before it (entry 0 is None)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, stop=[])
        return _then(self.sample(prompt, 1, params), lambda resp: resp.prompt_logprobs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await asyncio.wrap_future(self.compute_logprobs(prompt))


def _collect(streams: list[RequestStream], with_topk: bool) -> SampleResponse:
    response = SampleResponse([])
    for stream in streams:
        seq = SampledSequence()
        for out in stream:
            if out.error_kind is ErrorKind.CHECKPOINT:
                raise CheckpointInvalid(out.error)
            if out.finish_reason in ("error", "abort"):
                raise RuntimeError(f"sampling failed: {out.error or 'the request was aborted'}")
            seq.tokens += out.token_ids
            seq.logprobs += out.logprobs
            if out.prompt_logprobs is not None and response.prompt_logprobs is None:
                response.prompt_logprobs = out.prompt_logprobs
                if with_topk:
                    response.topk_prompt_logprobs = out.prompt_top_logprobs
            if out.finished:
                seq.stop_reason = "length" if out.finish_reason == "length" else "stop"
        response.sequences.append(seq)
    return response


def _then(future: Future, fn) -> Future:
    """A future for `fn(future.result())`, without tying up a thread to wait."""
    chained: Future = Future()

    def done(f: Future) -> None:
        try:
            chained.set_result(fn(f.result()))
        except BaseException as exc:
            chained.set_exception(exc)

    future.add_done_callback(done)
    return chained
