"""transformers as the oracle for the engine's models: greedy decoding by full recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_transformers_model(model_dir: Path):
    """The class config.json names (a vision-language checkpoint loads as itself), float32."""
    import transformers

    architecture = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    model_class = getattr(transformers, architecture)
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_greedy(model_dir: Path, prompt: list[int],
                        new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand with full recomputation: the plainest possible oracle."""
    model = load_transformers_model(model_dir)
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def assert_engine_decodes_like_transformers(engine, prompts: list[list[int]],
                                            want: list[tuple[list[int], list[float]]],
                                            new_tokens: int) -> None:
    """Greedy-decode `prompts` on the engine and compare with the oracle's (tokens,
    logprobs) for each: tokens exactly, logprobs within 1e-4.

    `prompts[1]` runs alone first (so a prefix cache holds it); then all of them at once:
    they batch, may hit that cache, and in a tiny cache preempt each other."""
    from engine import ModelInput, SamplingParams

    client = engine.sampling_client()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])
    first = client.sample(ModelInput.from_ints(prompts[1]), 1, params)
    first.result(timeout=120)
    futures = [client.sample(ModelInput.from_ints(p), 1, params) for p in prompts]
    for future, (want_tokens, want_logprobs) in zip([first] + futures, want[1:2] + want):
        seq = future.result(timeout=120).sequences[0]
        assert seq.tokens == want_tokens
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(want_logprobs),
                                   atol=1e-4, rtol=0)
