"""The embedded default model through the native client."""

from __future__ import annotations

import pytest

from engine import Engine, ModelInput, SamplingParams


@pytest.mark.model
def test_default_model_answers_paris_through_the_native_client(default_model_dir):
    engine = Engine(default_model_dir, progress=False)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = engine.tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
        resp = engine.sampling_client().sample(
            ModelInput.from_ints(ids), 1, SamplingParams(max_tokens=32, temperature=0.0)).result()
        seq = resp.sequences[0]
        assert "Paris" in engine.tokenizer.decode(seq.tokens)
        assert seq.stop_reason == "stop" and seq.tokens[-1] in engine.model_config.eos_token_ids
    finally:
        engine.shutdown()
