"""`pokeserve serve --batch-invariant` through the openai SDK: a seeded completion gives
the same text and the same logprobs, bit for bit, whether it runs alone or among other
concurrent requests, in bfloat16 (where the default mode parts after a few tokens,
BENCHMARKS.md); the flag reaches the engine with checkpoints served merged."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from api.cli import build_parser, engine_options
from engine.config import EngineConfig
from tests.api.conftest import API_KEY, MODEL, running_server

PROMPT = "Write a short story about a lighthouse keeper who"
NUM_OTHERS = 15


@pytest.fixture(scope="module")
def client(default_model_dir, tmp_path_factory):
    with running_server(default_model_dir, tmp_path_factory.mktemp("invariant-server"),
                        "--batch-invariant", "--dtype", "bfloat16") as srv:
        yield openai.OpenAI(base_url=srv.v1, api_key=API_KEY, max_retries=0, timeout=300)


def complete(client: openai.OpenAI, prompt: str, seed: int) -> tuple[str, list[float]]:
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=1.0,
                                     seed=seed, logprobs=1, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    return choice.text, choice.logprobs.token_logprobs


def other_prompts() -> list[str]:
    rng = random.Random(0)
    words = "the a river stone night engine paper window quiet seven orange".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 120)))
            for _ in range(NUM_OTHERS)]


def test_a_seeded_completion_is_bitwise_the_same_alone_and_among_concurrent_requests(client):
    alone = complete(client, PROMPT, seed=7)
    with ThreadPoolExecutor(NUM_OTHERS + 1) as pool:
        others = [pool.submit(complete, client, p, i) for i, p in enumerate(other_prompts())]
        together = pool.submit(complete, client, PROMPT, 7).result()
        for other in others:
            other.result()
    assert together == alone


def test_the_batch_invariant_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["serve", "--device", "cpu", "--batch-invariant"])
    config = EngineConfig(**engine_options(args))
    assert (config.batch_invariant, config.lora_mode) == (True, "merged")
    default = EngineConfig(**engine_options(build_parser().parse_args(["serve"])))
    assert (default.batch_invariant, default.lora_mode) == (False, "auto")
