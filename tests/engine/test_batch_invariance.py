"""The batch-invariant mode's contract, as property tests over whole engine runs.

For random batches of seeded requests (random prompts, some sharing a prefix, some
with several samples) served together by an engine with a random cache block size,
prefill chunk size (max_num_batched_tokens) and sometimes a cache so small that
sequences are preempted and recomputed: every request's tokens and logprobs are
bitwise what the same request gives alone on an engine with the default block and
chunk sizes, and its sample-time logprobs are bitwise what `compute_logprobs` gives
for the same tokens. In float32 and bfloat16, for each family's tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from engine import Engine, ModelInput, SamplingParams

# Few examples, tiny models: each example serves a batch and every request of it alone.
# No shrinking: it would start hundreds of engines (a few MB each that the process keeps);
# a failure is reported as generated, and derandomize makes it the same on every run.
EXAMPLES = settings(max_examples=5, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    # `request` only looks the model's directory up: nothing to reset per example
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
VOCAB = 300     # token ids below every tiny model's vocabulary size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE = {"kv_cache_memory": 1 << 24}    # 16 MiB each, not the default 1 GiB: many engines
MODELS = {  # name -> (fixture, key of its dict or None)
    "llama": ("tiny_model_dirs", "llama-gqa-untied"),
    "qwen3-moe": ("tiny_moe_model_dirs", "hub"),
    "gpt-oss": ("tiny_harmony_model_dir", None),
    "qwen3.5": ("hybrid_model_dirs", "qwen3_5-text"),
    "qwen3.5-moe": ("hybrid_model_dirs", "qwen3_5_moe-text"),
}


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    seed: int
    max_tokens: int
    num_samples: int
    top_p: float

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=1.0, top_p=self.top_p,
                              seed=self.seed, ignore_eos=True, stop=[])


def requests(vocab: int):
    """Batches of 2-6 requests; prompts are a shared stem (prefix-cache hits) or not,
    then random tokens."""
    tokens = st.lists(st.integers(3, vocab - 1), min_size=1, max_size=40)
    stem = st.sampled_from([(), tuple(range(10, 27))])
    request = st.builds(lambda s, rest, seed, m, n, p: Request(s + tuple(rest), seed, m, n, p),
                        stem, tokens, st.integers(0, 2**31), st.integers(1, 10),
                        st.sampled_from([1, 1, 2]), st.sampled_from([1.0, 0.9]))
    return st.lists(request, min_size=2, max_size=6)


engine_configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([3, 4, 16]),
    "max_num_batched_tokens": st.sampled_from([5, 16, 64, 2048]),
    "tight_cache": st.booleans(),
})


def serve(engine: Engine, batch: list[Request]) -> list[list[tuple[list[int], list[float]]]]:
    """Every request at once -> per request, per sample: (tokens, logprobs)."""
    client = engine.sampling_client()
    futures = [client.sample(ModelInput.from_ints(list(r.prompt)), r.num_samples, r.params())
               for r in batch]
    return [[(s.tokens, s.logprobs) for s in f.result(120).sequences] for f in futures]


class Alone:
    """Each request served on its own by an engine with the default block and chunk
    sizes, one per (model, dtype), remembered across examples."""

    def __init__(self) -> None:
        self.engines: dict[tuple, Engine] = {}
        self.results: dict[tuple, list] = {}

    def __call__(self, model_dir, dtype: torch.dtype, request: Request) -> list:
        key = (model_dir, dtype, request)
        if key not in self.results:
            if (model_dir, dtype) not in self.engines:
                self.engines[model_dir, dtype] = Engine(model_dir, dtype=dtype, **CACHE,
                                                        batch_invariant=True, progress=False)
            self.results[key] = serve(self.engines[model_dir, dtype], [request])[0]
        return self.results[key]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def alone():
    runs = Alone()
    yield runs
    runs.close()


def model_dir_of(request: pytest.FixtureRequest, name: str):
    fixture, key = MODELS[name]
    dirs = request.getfixturevalue(fixture)
    return dirs if key is None else dirs[key]


def tight_blocks(batch: list[Request], block_size: int) -> int:
    """Room for the longest sequence and a bit: the others wait, or are preempted."""
    longest = max(len(r.prompt) + r.max_tokens for r in batch)
    return -(-longest // block_size) + 2


def served_and_recomputed(model_dir, dtype: torch.dtype, options: dict, batch: list[Request]):
    """The batch served together by a new engine, and each sample's tokens recomputed by
    `compute_logprobs` there -> (per request per sample (tokens, logprobs), per request per
    sample the recomputed logprobs of its tokens, the engine's stats). The engine stays in
    this frame: a failing example's traceback must not hold it."""
    engine = Engine(model_dir, dtype=dtype, batch_invariant=True, progress=False, **options)
    try:
        served = serve(engine, batch)
        client = engine.sampling_client()
        recomputed = [[client.compute_logprobs(ModelInput.from_ints(list(r.prompt) + tokens))
                       .result(120)[len(r.prompt):] for tokens, _ in samples]
                      for r, samples in zip(batch, served)]
        return served, recomputed, engine.stats()
    finally:
        engine.shutdown()


def check(model_dir, dtype: torch.dtype, batch: list[Request], config: dict, alone: Alone):
    options = dict(block_size=config["block_size"],
                   max_num_batched_tokens=config["max_num_batched_tokens"])
    if config["tight_cache"]:
        options["num_kv_blocks"] = tight_blocks(batch, config["block_size"])
    else:
        options.update(CACHE)
    served, recomputed, stats = served_and_recomputed(model_dir, dtype, options, batch)
    event(f"preempted: {stats.num_preemptions > 0}")     # --hypothesis-show-statistics
    event(f"prefix-cache hits: {stats.num_prefix_cached_tokens > 0}")
    for req, samples, again in zip(batch, served, recomputed):
        assert samples == alone(model_dir, dtype, req)
        assert [logprobs for _, logprobs in samples] == again


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@EXAMPLES
@given(batch=requests(VOCAB), config=engine_configs)
def test_each_request_gets_its_own_bits_in_any_batch_and_as_recomputed(model, dtype, request,
                                                                         alone, batch, config):
    check(model_dir_of(request, model), DTYPES[dtype], batch, config, alone)


@pytest.mark.model
@pytest.mark.parametrize("dtype", DTYPES)
@settings(EXAMPLES, max_examples=2)
@given(batch=requests(VOCAB).map(lambda b: b[:3]), config=engine_configs)
def test_the_default_model_keeps_the_contract(dtype, default_model_dir, alone, batch, config):
    check(default_model_dir, DTYPES[dtype], batch, config, alone)
