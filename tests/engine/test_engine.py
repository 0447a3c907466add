"""The engine through its native client: sampling semantics, stops, errors, accounting."""

from __future__ import annotations

import threading

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.messages import Shutdown
from tests.tiny_models import EOS_ID

PROMPT = ModelInput.from_ints([5, 6, 7, 8, 9, 10])


@pytest.fixture(scope="module", params=["process", "thread"])
def engine(tiny_model_dirs, request):
    """The engine as users start it (its core in a process of its own), and with its core
    in a thread of this process: the native client behaves the same in both."""
    eng = Engine(tiny_model_dirs["qwen3-qk-norm-tied"], core=request.param, block_size=4,
                 num_kv_blocks=128, progress=False)
    yield eng
    eng.shutdown()


@pytest.fixture()
def client(engine):
    yield engine.sampling_client()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "a KV block leaked"


def sample(client, prompt=PROMPT, n=1, **params):
    return client.sample(prompt, n, SamplingParams(**params)).result(timeout=60)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_crowd(client):
    params = dict(max_tokens=12, temperature=1.0, seed=1234)
    alone = sample(client, **params).sequences[0].tokens
    others = [client.sample(ModelInput.from_ints([20 + i, 21, 22]), 1,
                            SamplingParams(max_tokens=20, temperature=1.0)) for i in range(6)]
    crowded = sample(client, **params).sequences[0].tokens
    for f in others:
        f.result(timeout=60)
    assert crowded == alone


def test_samples_of_one_seeded_request_differ_from_each_other(client):
    resp = sample(client, n=4, max_tokens=12, temperature=1.0, seed=7)
    assert len({tuple(s.tokens) for s in resp.sequences}) > 1


def test_sample_time_logprobs_equal_compute_logprobs(client):
    seq = sample(client, max_tokens=10, temperature=1.0, top_k=5, seed=3, stop=[]).sequences[0]
    recomputed = client.compute_logprobs(ModelInput.from_ints(PROMPT.to_ints() + seq.tokens))
    tail = recomputed.result(timeout=60)[PROMPT.length:]
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(tail), atol=1e-5, rtol=0)


def test_compute_logprobs_starts_with_none_and_covers_every_prompt_token(client):
    lps = client.compute_logprobs(PROMPT).result(timeout=60)
    assert lps[0] is None and len(lps) == PROMPT.length
    assert all(lp <= 0.0 for lp in lps[1:])


def test_prompt_logprobs_survive_chunked_prefill(tiny_model_dirs):
    prompt = ModelInput.from_ints(list(range(30, 70)))
    results = []
    for chunk in (8, 2048):
        eng = Engine(tiny_model_dirs["qwen3-qk-norm-tied"], block_size=4, num_kv_blocks=64,
                     max_num_batched_tokens=chunk, progress=False)
        results.append(eng.sampling_client().compute_logprobs(prompt).result(timeout=60))
        eng.shutdown()
    chunked, whole = results
    assert chunked[0] is None and whole[0] is None
    torch.testing.assert_close(torch.tensor(chunked[1:]), torch.tensor(whole[1:]), atol=1e-5, rtol=0)


def test_top_logprobs_are_sorted_and_include_the_greedy_choice(engine):
    stream = engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3, temperature=0.0,
                                                                 logprobs=5, stop=[]))[0]
    outs = list(stream)
    for out in outs:
        (top,) = out.top_logprobs
        assert len(top) == 5
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[0][0] == out.token_ids[0]
        assert top[0][1] == pytest.approx(out.logprobs[0], abs=1e-6)


def test_max_tokens_ends_with_length(client):
    seq = sample(client, max_tokens=5, temperature=0.0, stop=[]).sequences[0]
    assert len(seq.tokens) == 5 and seq.stop_reason == "length"


def test_eos_stops_by_default_but_not_with_an_empty_stop_list(client):
    # A logit bias makes EOS the greedy choice at once.
    bias = {EOS_ID: 100.0}
    stopped = sample(client, max_tokens=5, temperature=0.0, logit_bias=bias).sequences[0]
    assert stopped.tokens == [EOS_ID] and stopped.stop_reason == "stop"
    free = sample(client, max_tokens=5, temperature=0.0, logit_bias=bias, stop=[]).sequences[0]
    assert free.tokens == [EOS_ID] * 5 and free.stop_reason == "length"


def test_stop_token_ids_end_the_sequence_on_that_token(client):
    greedy = sample(client, max_tokens=8, temperature=0.0, stop=[]).sequences[0].tokens
    target = greedy[3]
    seq = sample(client, max_tokens=8, temperature=0.0, stop=[target]).sequences[0]
    assert seq.tokens == greedy[:greedy.index(target) + 1] and seq.stop_reason == "stop"


def test_min_tokens_holds_off_eos(client):
    seq = sample(client, max_tokens=6, temperature=0.0, min_tokens=4,
                 logit_bias={EOS_ID: 100.0}).sequences[0]
    assert EOS_ID not in seq.tokens[:4] and seq.tokens[4] == EOS_ID and len(seq.tokens) == 5


def test_stop_string_truncates_text_and_finishes(engine):
    greedy = list(engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=10, temperature=0.0,
                                                                      stop=[]))[0])
    text = "".join(o.text for o in greedy)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    outs = list(engine.add_request(PROMPT.to_ints(), SamplingParams(
        max_tokens=10, temperature=0.0, stop=stop))[0])
    assert "".join(o.text for o in outs) == text[:text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop


def test_prompt_too_long_names_both_numbers_and_the_engine_keeps_serving(engine, client):
    too_long = [5] * (engine.max_model_len - 3)
    with pytest.raises(ValueError, match=rf"{engine.max_model_len}.*{engine.max_model_len + 7}"):
        engine.add_request(too_long, SamplingParams(max_tokens=10))[0]
    assert sample(client, max_tokens=2, temperature=0.0).sequences


@pytest.mark.parametrize("bad", [
    dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-5), dict(max_tokens=0),
    dict(stop=["a", 3]), dict(logprobs=21), dict(min_p=1.5),
])
def test_bad_sampling_params_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("prompt", [[], [10**6], [-1]])
def test_bad_prompts_are_refused(engine, prompt):
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(prompt, SamplingParams(max_tokens=2))[0]


@pytest.mark.parametrize("field", ["prompt", "stop_token_ids", "logit_bias"])
def test_token_ids_past_either_edge_of_the_vocabulary_are_refused(engine, field):
    vocab = engine.model_config.vocab_size

    def request(token: int):
        prompt = [token] if field == "prompt" else [5, 6]
        extra = {"stop_token_ids": dict(stop_token_ids=[token]),
                 "logit_bias": dict(logit_bias={token: 1.0})}.get(field, {})
        params = SamplingParams(max_tokens=2, temperature=0.0, min_tokens=1, **extra)
        stream, = engine.add_request(prompt, params)
        return list(stream)

    for token in (-1, vocab, 10**30):
        with pytest.raises(ValueError, match=rf"{field}.*\[0, {vocab}\)"):
            request(token)
    for token in (0, vocab - 1):   # the edges themselves are ids
        assert request(token)[-1].finish_reason in ("length", "stop")
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_abort_frees_the_sequence_at_once(engine):
    stream = engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=200, stop=[]))[0]
    stream.get(timeout=60)
    engine.abort(stream.request_id)
    outs = list(stream)
    assert outs[-1].finish_reason == "abort"
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_many_threads_sample_at_once(client):
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            results[i] = sample(client, ModelInput.from_ints([3 + i, 4, 5]), max_tokens=6,
                                temperature=0.0).sequences[0].tokens
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 16
    alone = sample(client, ModelInput.from_ints([3 + 5, 4, 5]), max_tokens=6, temperature=0.0)
    assert results[5] == alone.sequences[0].tokens


def test_sample_async_is_the_asyncio_twin(client):
    import asyncio

    async def go():
        return await client.sample_async(PROMPT, 1, SamplingParams(max_tokens=4, temperature=0.0))

    resp = asyncio.run(go())
    assert resp.sequences[0].tokens == sample(client, max_tokens=4, temperature=0.0).sequences[0].tokens


def test_bfloat16_engine_runs_and_mostly_agrees_with_float32(tiny_model_dirs):
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        eng = Engine(tiny_model_dirs["llama-gqa-untied"], dtype=dtype, block_size=4,
                     num_kv_blocks=64, progress=False)
        resp = eng.sampling_client().sample(PROMPT, 1, SamplingParams(
            max_tokens=8, temperature=0.0, stop=[])).result(timeout=60)
        outs[dtype] = resp.sequences[0]
        eng.shutdown()
    assert outs[torch.float32].tokens[:3] == outs[torch.bfloat16].tokens[:3]
    torch.testing.assert_close(torch.tensor(outs[torch.bfloat16].logprobs[:3]),
                               torch.tensor(outs[torch.float32].logprobs[:3]), atol=0.1, rtol=0)


def test_a_request_id_already_in_use_fails_only_the_newcomer(engine):
    first = engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=30, stop=[]),
                               request_id="dup")[0]
    second = engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3), request_id="dup")[0]
    assert [o.finish_reason for o in second][-1] == "error"
    outs = list(first)
    assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 30


def test_an_engine_bug_fails_every_request_instead_of_hanging(tiny_model_dirs, monkeypatch):
    eng = Engine(tiny_model_dirs["qwen3-qk-norm-tied"], core="thread", block_size=4,
                 num_kv_blocks=32, progress=False)
    try:
        def broken_schedule():
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(eng.core.scheduler, "schedule", broken_schedule)
        stream = eng.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3))[0]
        out = stream.get(timeout=30)
        assert out.finish_reason == "error" and "scheduler bug" in out.error
        eng._core._thread.join(timeout=30)
        assert not eng.is_alive()
        with pytest.raises(RuntimeError, match="not running"):
            eng.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3))[0]
    finally:
        eng.shutdown()


def test_stop_strings_only_count_from_min_tokens_on(engine):
    greedy = list(engine.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=12, temperature=0.0,
                                                                      stop=[]))[0])
    pieces = [o.text for o in greedy]
    stop = next(p for p in pieces[:4] if p.strip())       # text from the first few tokens
    outs = list(engine.add_request(PROMPT.to_ints(), SamplingParams(
        max_tokens=12, temperature=0.0, stop=stop, min_tokens=6))[0])
    text = "".join(o.text for o in outs)
    assert sum(len(o.token_ids) for o in outs) >= 6
    assert text.startswith("".join(pieces[:4]))           # the early stop string was kept
    assert outs[-1].finish_reason in ("stop", "length")


def test_kv_cache_budget_on_cuda_is_what_the_model_leaves_of_the_utilization(monkeypatch):
    from engine.config import CPU_KV_CACHE_BYTES, EngineConfig

    gib = 1 << 30
    # A 80 GiB card with 20 GiB in use (weights): 0.9 * 80 - 20 = 52 GiB for the cache.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * gib, 80 * gib))
    assert EngineConfig(device="cuda").kv_cache_bytes() == 52 * gib
    assert EngineConfig(device="cuda", gpu_memory_utilization=0.2).kv_cache_bytes() == 0
    assert EngineConfig(device="cuda", kv_cache_memory=gib).kv_cache_bytes() == gib
    assert EngineConfig(device="cpu").kv_cache_bytes() == CPU_KV_CACHE_BYTES


def test_the_caller_may_run_the_loop_on_its_own_thread(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["qwen3-qk-norm-tied"], core="inline", block_size=4,
                 num_kv_blocks=32, progress=False)
    results = {}

    def client_thread():
        try:
            client = eng.sampling_client()
            results["greedy"] = sample(client, max_tokens=5, temperature=0.0, stop=[])
            results["open"] = eng.add_request(PROMPT.to_ints(),
                                              SamplingParams(max_tokens=100, stop=[]))[0]
        finally:
            eng.shutdown()

    threading.Thread(target=client_thread).start()
    eng.run()                     # returns once the client thread shuts the engine down
    assert len(results["greedy"].sequences[0].tokens) == 5
    assert [o.finish_reason for o in results["open"]][-1] == "abort"
    assert not eng.is_alive()
    assert eng.core.block_manager.num_free_blocks == eng.core.block_manager.num_total_blocks
    with pytest.raises(RuntimeError, match="not running"):
        eng.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3))[0]


def test_a_request_queued_as_the_loop_stops_is_answered(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["qwen3-qk-norm-tied"], core="inline", block_size=4,
                 num_kv_blocks=32, progress=False)
    stream = eng.add_request(PROMPT.to_ints(), SamplingParams(max_tokens=3))[0]
    inbox = eng._core.inbox
    inbox.put(Shutdown())         # the stop overtakes the add, as a racing shutdown may
    inbox.put(inbox.get())
    eng.run()
    assert stream.get(timeout=5).finish_reason == "abort"
