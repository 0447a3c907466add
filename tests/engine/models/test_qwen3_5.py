"""Qwen3.5 (hybrid Gated DeltaNet + gated attention), dense and MoE, against transformers:
greedy tokens exactly, logprobs within 1e-4 (float32), text and vision-language layouts.

Every cache layout of parity.py is covered (preemption: states are recomputed, from a
kept one where there is one; chunked prefill: states carried from chunk to chunk), and
fewer state slots than requests (sequences wait for a slot). No block or slot may leak.
Cached prefixes resume from the linear-attention states kept at their last block
(engine.state_snapshots), of a prompt or of an output.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import Engine, ModelInput, SamplingParams, llm_engine
from tests.engine.models.parity import (
    ENGINE_LAYOUTS,
    SHARED,
    assert_engine_matches,
    transformers_outputs,
)
from tests.tiny_models import save_state_dict_copy

NEW_TOKENS = 24
# Lengths 3, 22, 21, 1 (a one-token prompt starts as a decode) and 70 (over one chunk of
# the chunked delta rule); two share a prefix that is served from the cache.
PROMPTS = [[5, 6, 7], SHARED + [40, 41], list(range(60, 81)), [9], SHARED + list(range(100, 150))]
LAYOUTS = {**ENGINE_LAYOUTS,
           "preemption": dict(block_size=4, num_kv_blocks=28),    # 112 slots: one long prompt
           "two-state-slots": dict(block_size=4, num_kv_blocks=256, max_num_seqs=2)}


@pytest.fixture(scope="module")
def model_dirs(hybrid_model_dirs, tmp_path_factory):
    """The tiny models; the vision-language one also carries an MTP head to be skipped, and
    the MoE text model comes again with its experts fused (`experts.gate_up_proj`)."""
    # A copy: the session's directory is other tests' too.
    vl_dir = shutil.copytree(hybrid_model_dirs["qwen3_5-vl-tied"],
                             tmp_path_factory.mktemp("mtp") / "qwen3_5-vl-tied")
    tensors = load_file(vl_dir / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.full((64, 128), float("nan"))
    save_file(tensors, vl_dir / "model.safetensors", metadata={"format": "pt"})
    fused = save_state_dict_copy(hybrid_model_dirs["qwen3_5_moe-text"],
                                 tmp_path_factory.mktemp("fused") / "qwen3_5_moe-text-fused")
    return {**hybrid_model_dirs, "qwen3_5-vl-tied": vl_dir, "qwen3_5_moe-text-fused": fused}


@pytest.fixture(scope="module")
def oracle(model_dirs):
    return {name: transformers_outputs(path, PROMPTS, NEW_TOKENS)
            for name, path in model_dirs.items() if not name.endswith("-fused")}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["qwen3_5-text", "qwen3_5-vl-tied", "qwen3_5_moe-text",
                                    "qwen3_5_moe-vl"])
def test_greedy_tokens_and_logprobs_match_transformers(family, layout, model_dirs, oracle):
    assert_engine_matches(model_dirs[family], layout, oracle[family], LAYOUTS, PROMPTS)


def test_fused_expert_weights_load_to_the_same_outputs(model_dirs, oracle):
    assert_engine_matches(model_dirs["qwen3_5_moe-text-fused"], "block4",
                          oracle["qwen3_5_moe-text"], LAYOUTS, PROMPTS)


def test_forked_samples_continue_from_the_shared_prefill_as_each_would_alone(model_dirs,
                                                                             monkeypatch):
    """n samples of one prompt: the prompt is computed once, each forked sample continues
    from a copy of the state its prefill left and gives what it gives alone."""
    engine = Engine(model_dirs["qwen3_5-text"], progress=False, block_size=4, num_kv_blocks=256)
    try:
        client, prompt = engine.sampling_client(), PROMPTS[4]
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, stop=[])
        before = engine.stats().num_computed_prompt_tokens
        together = client.sample(ModelInput.from_ints(prompt), 3, params).result(60).sequences
        assert engine.stats().num_computed_prompt_tokens - before == len(prompt)
        assert len({tuple(s.tokens) for s in together}) > 1
        seed_of = llm_engine._sample_seed
        for i, sample in enumerate(together):
            monkeypatch.setattr(llm_engine, "_sample_seed", lambda seed, _, i=i: seed_of(seed, i))
            alone = client.sample(ModelInput.from_ints(prompt), 1, params).result(60).sequences[0]
            assert alone.tokens == sample.tokens
            torch.testing.assert_close(torch.tensor(alone.logprobs),
                                       torch.tensor(sample.logprobs), atol=1e-5, rtol=0)
        stats = engine.stats()
        assert stats.num_free_state_slots == stats.num_total_state_slots
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def run_together(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    """Queue every prompt, then run the (inline) engine's loop until all are answered:
    the prompts meet in its first step. Each prompt's RequestOutputs."""
    streams = [engine.add_request(prompt, params)[0] for prompt in prompts]
    outputs = []

    def client_thread():
        try:
            outputs.extend([list(stream) for stream in streams])
        finally:
            engine.shutdown()

    threading.Thread(target=client_thread).start()
    engine.run()
    return outputs


def assert_matches(records: list, want_tokens: list[int], want_logprobs: list[float]) -> None:
    assert [t for r in records for t in r.token_ids] == want_tokens
    torch.testing.assert_close(torch.tensor([p for r in records for p in r.logprobs]),
                               torch.tensor(want_logprobs), atol=1e-4, rtol=0)


def test_a_prompt_resumes_from_the_state_another_prefill_kept_a_step_before(model_dirs):
    """Two prompts with a shared prefix arrive together: the second waits a step for the
    first to compute the prefix, then resumes from the state kept there, both copies made
    before the same step (keep, then resume); each gives what transformers gives."""
    prompts = [SHARED + [40, 41], SHARED + [42, 43, 44]]
    expected = transformers_outputs(model_dirs["qwen3_5-text"], prompts, 8)
    engine = Engine(model_dirs["qwen3_5-text"], core="inline", progress=False, block_size=4,
                    num_kv_blocks=64)
    copies, execute = [], engine.core.runner.execute

    def recording_execute(batch, slots=None):
        copies.append(list(batch.state_copies))
        return execute(batch, slots)

    engine.core.runner.execute = recording_execute
    outputs = run_together(engine, prompts, SamplingParams(max_tokens=8, temperature=0.0,
                                                           stop=[]))
    for records, want in zip(outputs, expected):
        assert_matches(records, *want)
    assert outputs[1][0].num_cached_tokens == len(SHARED)       # on the first record
    kept_and_resumed = [c for c in copies if len(c) == 2 and c[0][1] == c[1][0]]
    assert len(kept_and_resumed) == 1
    core = engine.core
    assert core.state_slots.num_free_slots == core.state_slots.num_total_slots
    assert core.block_manager.num_free_blocks == core.block_manager.num_total_blocks


@pytest.mark.parametrize("arrival", ["one-after-another", "together"])
def test_prompts_that_share_an_unaligned_prefix_are_served_from_the_third_on(model_dirs,
                                                                            arrival):
    """A shared prefix that ends inside the prompts' last blocks: the first prompt keeps
    its state past it, the second stops where it leaves the first's blocks and keeps the
    state there, the third resumes from it (arriving with the others, it waits a step for
    it); each gives what transformers gives."""
    model = model_dirs["qwen3_5-text"]
    prompts = [SHARED + list(range(40 + 10 * i, 45 + 11 * i)) for i in range(3)]
    expected = transformers_outputs(model, prompts, 6)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    if arrival == "together":
        engine = Engine(model, core="inline", progress=False, block_size=4, num_kv_blocks=256)
        outputs = run_together(engine, prompts, greedy)
    else:
        engine = Engine(model, core="thread", progress=False, block_size=4, num_kv_blocks=256)
        try:
            outputs = [list(engine.add_request(prompt, greedy)[0]) for prompt in prompts]
        finally:
            engine.shutdown()
    for records, want in zip(outputs, expected):
        assert_matches(records, *want)
    assert [r[0].num_cached_tokens for r in outputs] == [0, 0, len(SHARED)]


def test_a_next_turn_resumes_from_the_state_kept_at_its_last_outputs_end(model_dirs):
    """A conversation's next prompt is the last prompt, its output and more: it resumes
    from the state the decode kept at the output's last block boundary (not only from the
    prompt's), and gives what transformers gives."""
    model = model_dirs["qwen3_5-text"]
    engine = Engine(model, progress=False, block_size=4, num_kv_blocks=256)
    try:
        greedy = SamplingParams(max_tokens=11, temperature=0.0, stop=[])
        first = engine.sampling_client().sample(ModelInput.from_ints(PROMPTS[1]), 1,
                                                greedy).result(60).sequences[0]
        # 22 prompt tokens and 10 of the 11 sampled were computed: a boundary at 32.
        assert len(PROMPTS[1]) + len(first.tokens) - 1 == 32
        prompt = PROMPTS[1] + first.tokens + [50, 51]
        [(want_tokens, want_logprobs)] = transformers_outputs(model, [prompt], 8)
        records = list(engine.add_request(prompt, replace(greedy, max_tokens=8))[0])
        assert records[0].num_cached_tokens == 32
        assert [t for r in records for t in r.token_ids] == want_tokens
        torch.testing.assert_close(torch.tensor([p for r in records for p in r.logprobs]),
                                   torch.tensor(want_logprobs), atol=1e-4, rtol=0)
        stats = engine.stats()
        assert stats.num_free_state_slots == stats.num_total_state_slots
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def test_the_vision_tower_and_mtp_head_are_skipped_unread(model_dirs, monkeypatch):
    from engine.models import loader
    from engine.models.registry import load_model_config

    names, read = [], []
    real_open = loader.safe_open

    class RecordingFile:
        """safe_open, noting every tensor name listed and every tensor read."""

        def __init__(self, path, framework):
            self.file = real_open(path, framework=framework)

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            names.extend(self.handle.keys())
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", RecordingFile)
    model_dir = model_dirs["qwen3_5-vl-tied"]
    loader.load_model(model_dir, load_model_config(model_dir), "cpu", torch.float32,
                      progress=False)
    assert any(n.startswith("model.visual.") for n in names) and "mtp.fc.weight" in names
    assert read and all(name.startswith("model.language_model.") for name in read)
