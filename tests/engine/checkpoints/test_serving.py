"""Serving sampler checkpoints through the engine: each request gets its own model's
outputs (oracle: transformers + PEFT), switching is exact, checkpoints written while
the engine runs are served as soon as they are complete, and bad ones only fail their
own requests."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import Engine, ModelInput, SamplingParams
from engine.checkpoints.store import (
    CheckpointError,
    CheckpointIncomplete,
    CheckpointInvalid,
    CheckpointNotFound,
)
from engine.outputs import ErrorKind
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    greedy,
    pack_archive,
    peft_logprobs_fn,
    save_nan_adapter,
    save_peft_adapter,
)

RUN = "0034d8c9-0a88-52a9-b2b7-bce7cb1e6fef:train:0"
PROMPTS = [[5, 17, 42, 99, 7, 23, 61, 130, 8, 77], [200, 3, 54, 9]]
TOLERANCE = 1e-4


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[])


def reference(model_dir: Path, adapter: Path | None, prompt: list[int],
              n: int) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens and their logprobs."""
    logprobs = peft_logprobs_fn(model_dir, adapter)
    tokens = greedy(logprobs, prompt, n)
    rows = logprobs(prompt + tokens)[len(prompt) - 1:-1]
    return tokens, rows.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist()


def assert_matches(sequence, expected: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = expected
    assert sequence.tokens == tokens
    torch.testing.assert_close(torch.tensor(sequence.logprobs), torch.tensor(logprobs),
                               atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dir) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    save_peft_adapter(model_dir, root / RUN / "sampler_weights" / "a", seed=1,
                      targets=[*ALL_LINEAR, "lm_head"])
    save_peft_adapter(model_dir, root / RUN / "sampler_weights" / "b", seed=2, r=4,
                      targets=["q_proj", "down_proj", "embed_tokens"], use_rslora=True)
    return root


@pytest.fixture(scope="module")
def engine(model_dir, root):
    eng = Engine(model_dir, block_size=4, num_kv_blocks=256, checkpoint_root=str(root), progress=False)
    yield eng
    eng.shutdown()


def test_interleaved_requests_for_two_checkpoints_and_the_base_get_their_own_outputs(engine, model_dir, root):
    # 24 tokens each: longer than the scheduler's turn on one checkpoint, so it switches
    # back and forth while sequences of each checkpoint are half-way through.
    checkpoints = [f"tinker://{RUN}/sampler_weights/a", f"tinker://{RUN}/sampler_weights/b", None]
    dirs = dict(zip(checkpoints, [root / RUN / "sampler_weights/a", root / RUN / "sampler_weights/b", None]))
    futures = [(checkpoint, prompt, engine.sampling_client(checkpoint).sample(
                    ModelInput.from_ints(prompt), 1, greedy_params(24)))
               for _ in range(2) for prompt in PROMPTS for checkpoint in checkpoints]
    expected = {(c, tuple(p)): reference(model_dir, dirs[c], p, 24) for c in checkpoints for p in PROMPTS}
    for checkpoint, prompt, future in futures:
        assert_matches(future.result(timeout=120).sequences[0], expected[checkpoint, tuple(prompt)])


def test_switching_a_b_a_through_the_engine_is_bit_exact(model_dir, root):
    # No prefix cache: the second request for A recomputes everything with A's weights.
    eng = Engine(model_dir, block_size=4, num_kv_blocks=64, checkpoint_root=str(root),
                 enable_prefix_caching=False, progress=False)
    try:
        prompt = ModelInput.from_ints(PROMPTS[0])
        params = SamplingParams(max_tokens=8, temperature=0.0, stop=[], prompt_logprobs=0)
        runs = [eng.sampling_client(f"tinker://{RUN}/sampler_weights/{name}").sample(prompt, 1, params)
                .result(timeout=60) for name in ("a", "b", "a")]
    finally:
        eng.shutdown()
    first, other, again = runs
    assert again.sequences[0].tokens == first.sequences[0].tokens
    assert again.sequences[0].logprobs == first.sequences[0].logprobs        # bit-identical floats
    assert again.prompt_logprobs == first.prompt_logprobs
    assert other.prompt_logprobs != first.prompt_logprobs


def write_like_a_training_job(src: Path, dest: Path, pause: float) -> None:
    """Config and weights first (the weights in two writes), `checkpoint_complete` last."""
    dest.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dest)
    data = (src / "adapter_model.safetensors").read_bytes()
    with open(dest / "adapter_model.safetensors", "wb") as f:
        f.write(data[:len(data) // 2])
        f.flush()
        time.sleep(pause)
        f.write(data[len(data) // 2:])
    time.sleep(pause)
    (dest / "checkpoint_complete").touch()


def test_checkpoints_saved_while_serving_are_served_once_complete(engine, model_dir, root, tmp_path):
    steps = ["000010", "000020", "000030", "000040"]
    staged = {step: save_peft_adapter(model_dir, tmp_path / step, seed=int(step), targets=ALL_LINEAR)
              for step in steps}
    run_dir = root / "live-run:train:0" / "sampler_weights"

    def train() -> None:
        for step in steps:
            write_like_a_training_job(staged[step], run_dir / step, pause=0.05)
            time.sleep(0.05)

    names = {f"tinker://live-run:train:0/sampler_weights/{step}": step for step in steps}
    futures, refusals = {}, []
    writer = threading.Thread(target=train, daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while len(futures) < len(names) and time.monotonic() < deadline:
        listed = {info.name for info in engine.checkpoints.list()}
        for name in names.keys() - futures.keys():
            try:   # a name not yet listed is refused, or was completed just now and is whole
                futures[name] = engine.sampling_client(name).sample(
                    ModelInput.from_ints(PROMPTS[0]), 1, greedy_params(6))
            except (CheckpointIncomplete, CheckpointNotFound) as e:
                assert name not in listed, e
                refusals.append(type(e))
        time.sleep(0.005)
    writer.join()
    assert futures.keys() == names.keys()
    assert CheckpointIncomplete in refusals   # the half-written state was seen, and refused
    for name, future in futures.items():
        expected = reference(model_dir, staged[names[name]], PROMPTS[0], 6)
        assert_matches(future.result(timeout=60).sequences[0], expected)


def test_bad_checkpoints_get_clear_errors_and_others_keep_being_served(engine, model_dir, root, tmp_path):
    checkpoint = f"tinker://{RUN}/sampler_weights/a"
    running = engine.sampling_client(checkpoint).sample(ModelInput.from_ints(PROMPTS[1]), 1,
                                                        greedy_params(24))
    bad_dir = root / RUN / "sampler_weights"
    save_peft_adapter(model_dir, bad_dir / "half", seed=3)
    (bad_dir / "half" / "checkpoint_complete").unlink()
    save_peft_adapter(model_dir, bad_dir / "corrupt", seed=4)
    (bad_dir / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    cases = [(f"tinker://{RUN}/sampler_weights/../../etc", CheckpointError, "`..`"),
             (str(tmp_path), CheckpointError, "outside the checkpoint root"),
             (f"tinker://{RUN}/sampler_weights/half", CheckpointIncomplete, "still being written"),
             (f"tinker://{RUN}/sampler_weights/nope", CheckpointNotFound, "does not exist"),
             (f"tinker://{RUN}/sampler_weights/corrupt", CheckpointInvalid,
              "adapter_model.safetensors is corrupt")]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            engine.add_request(PROMPTS[0], greedy_params(4),
                               checkpoint=engine.checkpoints.resolve(name))
    assert_matches(running.result(timeout=60).sequences[0],
                   reference(model_dir, root / RUN / "sampler_weights/a", PROMPTS[1], 24))
    after = engine.sampling_client(engine.model_name).sample(ModelInput.from_ints(PROMPTS[0]), 1,
                                                             greedy_params(4))
    assert_matches(after.result(timeout=60).sequences[0], reference(model_dir, None, PROMPTS[0], 4))


def test_a_sampling_client_for_a_missing_checkpoint_is_refused_at_once(tiny_model_dirs, tmp_path):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], block_size=4, num_kv_blocks=16,
                 checkpoint_root=str(tmp_path), progress=False)
    try:
        with pytest.raises(CheckpointError, match="does not exist"):
            eng.sampling_client("tinker://run:train:0/sampler_weights/000010")
    finally:
        eng.shutdown()


def test_an_adapter_found_broken_when_loaded_fails_its_requests_and_leaves_the_weights(
        engine, model_dir, root):
    name = "tinker://broken-run:train:0/sampler_weights/nan"
    save_nan_adapter(model_dir, root / "broken-run:train:0" / "sampler_weights" / "nan")
    good = f"tinker://{RUN}/sampler_weights/a"
    prompt = ModelInput.from_ints(PROMPTS[0])
    engine.sampling_client(good).sample(prompt, 1, greedy_params(2)).result(timeout=60)
    with pytest.raises(CheckpointInvalid, match="NaN"):   # the client, the checkpoint's words
        engine.sampling_client(name).sample(prompt, 1, greedy_params(4)).result(timeout=60)
    stream, = engine.add_request(PROMPTS[0], greedy_params(4),
                                 checkpoint=engine.checkpoints.resolve(name))
    last = list(stream)[-1]
    assert last.finish_reason == "error" and last.error_kind is ErrorKind.CHECKPOINT
    assert last.error.startswith("Checkpoint `nan` cannot be served") and "NaN" in last.error
    # Neither the adapter merged before nor the base weights were touched.
    for checkpoint, adapter in ((good, root / RUN / "sampler_weights/a"), (None, None)):
        after = engine.sampling_client(checkpoint).sample(prompt, 1, greedy_params(6))
        assert_matches(after.result(timeout=60).sequences[0],
                       reference(model_dir, adapter, PROMPTS[0], 6))
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_downloaded_and_archived_checkpoints_are_served_by_their_tinker_names(
        model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POKESERVE_HOME", str(tmp_path / "home"))   # where archives are extracted
    root = tmp_path / "root"
    first = save_peft_adapter(model_dir, tmp_path / "first", seed=5, targets=[*ALL_LINEAR, "lm_head"])
    second = save_peft_adapter(model_dir, tmp_path / "second", seed=6, r=4)
    shutil.copytree(first, root / f"{RUN}_sampler_weights_downloaded")
    archive = pack_archive(second, root / RUN / "sampler_weights" / "packed.tar")
    downloaded, packed = (f"tinker://{RUN}/sampler_weights/{n}" for n in ("downloaded", "packed"))
    eng = Engine(model_dir, block_size=4, num_kv_blocks=64, checkpoint_root=str(root), progress=False)
    try:
        assert sorted(info.name for info in eng.checkpoints.list()) == [downloaded, packed]

        def sample(name: str):
            return eng.sampling_client(name).sample(ModelInput.from_ints(PROMPTS[0]), 1,
                                                    greedy_params(8)).result(timeout=60).sequences[0]
        assert_matches(sample(downloaded), reference(model_dir, first, PROMPTS[0], 8))
        assert_matches(sample(packed), reference(model_dir, second, PROMPTS[0], 8))
        pack_archive(first, archive)   # replaced in place: the next request serves the new one
        os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
        assert_matches(sample(packed), reference(model_dir, first, PROMPTS[0], 8))
    finally:
        eng.shutdown()
    assert [p.parent for p in (tmp_path / "home").rglob("checkpoint_complete")] == [
        eng.checkpoints.resolve(packed).path]
