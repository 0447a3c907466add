"""Several checkpoints in one batch over HTTP (the `openai` SDK against a real server):
each chat completion of a mixed batch equals the same request served alone, tokens and
logprobs; a checkpoint whose rank is above --max-lora-rank is a 400 naming the rank;
the serve command's LoRA flags reach the engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from api.cli import build_parser, engine_options, main
from engine.config import EngineConfig
from tests.api.conftest import MODEL
from tests.engine.checkpoints.helpers import (
    ALL_LINEAR,
    save_peft_adapter,
    to_training_service_layout,
)

pytestmark = pytest.mark.model

RUN = "mixed:train:0"
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Say hello."]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(server, default_model_dir, tmp_path_factory) -> list[str]:
    """Three checkpoints of different ranks and shapes, written after the server started."""
    steps = server.checkpoint_root / RUN / "sampler_weights"
    peft = save_peft_adapter(default_model_dir, tmp_path_factory.mktemp("peft") / "wide", r=8,
                             seed=1, targets=[*ALL_LINEAR, "lm_head"], std=0.02)
    to_training_service_layout(peft, steps / "wide")              # the head as unembed_tokens
    save_peft_adapter(default_model_dir, steps / "rs", r=4, seed=2, use_rslora=True, std=0.02,
                      targets=["q_proj", "down_proj", "embed_tokens"])
    save_peft_adapter(default_model_dir, steps / "pattern", r=6, seed=3, std=0.02,
                      rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})
    return [f"tinker://{RUN}/sampler_weights/{step}" for step in ("wide", "rs", "pattern")]


def chat(client: openai.OpenAI, model: str, question: str) -> list[tuple[str, float]]:
    resp = client.chat.completions.create(model=model, max_tokens=8, temperature=0, logprobs=True,
                                          messages=[{"role": "user", "content": question}])
    return [(t.token, t.logprob) for t in resp.choices[0].logprobs.content]


def test_chat_completions_in_a_mixed_batch_equal_each_served_alone(client, server, checkpoints):
    jobs = [(model, q) for q in QUESTIONS for model in [*checkpoints, MODEL]]
    alone = [chat(client, *job) for job in jobs]
    before = server.metric("pokeserve_lora_unmerged_steps_total")
    with ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda job: chat(client, *job), jobs))
    assert server.metric("pokeserve_lora_unmerged_steps_total") > before
    for got, want in zip(mixed, alone):
        assert [token for token, _ in got] == [token for token, _ in want]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < TOLERANCE
    assert len({tuple(answer) for answer in alone[:4]}) == 4   # four models, four answers


def test_a_rank_above_max_lora_rank_is_a_400_naming_it(client, server, default_model_dir):
    path = server.checkpoint_root / RUN / "sampler_weights" / "huge"
    save_peft_adapter(default_model_dir, path, r=72, targets=["q_proj"])
    with pytest.raises(openai.BadRequestError, match=r"LoRA rank 72 is above the largest rank "
                       r"this server holds, 64 \(serve it with --max-lora-rank 72 or more\)"):
        chat(client, f"tinker://{RUN}/sampler_weights/huge", QUESTIONS[0])


def test_the_lora_flags_of_serve_reach_the_engine_config():
    args = build_parser().parse_args(["serve", "--device", "cpu", "--max-loras", "4",
                                      "--max-cpu-loras", "8", "--max-lora-rank", "128",
                                      "--lora-mode", "unmerged"])
    config = EngineConfig(**engine_options(args))
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank,
            config.lora_mode) == (4, 8, 128, "unmerged")
    defaults = EngineConfig(**engine_options(build_parser().parse_args(["serve"])))
    assert (defaults.max_loras, defaults.max_cpu_loras, defaults.max_lora_rank) == (
        EngineConfig.max_loras, None, EngineConfig.max_lora_rank)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-loras", "0"])


def test_serve_refuses_flags_that_cannot_go_together_before_loading_a_model(capsys,
                                                                           monkeypatch):
    # Were the flags let through, the test fails at once rather than serving forever.
    monkeypatch.setattr("api.server.serve", lambda *args: pytest.fail("serve started"))
    assert main(["serve", "--batch-invariant", "--lora-mode", "unmerged"]) == 2
    assert "cannot go with lora_mode 'unmerged'" in capsys.readouterr().err
