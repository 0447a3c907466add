"""The text a finishing sequence releases: whatever the detokenizer still holds comes out
with the last output, so the joined text equals `tokenizer.decode` of the output tokens
(an unfinished last character reads U+FFFD there too). Oracle: the tokenizer's decode."""

from __future__ import annotations

import pytest

from engine import Engine, SamplingParams

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = Engine(tiny_model_dirs["llama-gqa-untied"], block_size=4, num_kv_blocks=32,
                 progress=False)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def first_byte_of_e_acute(engine) -> int:
    """The byte-level token of 0xC3, the first of the two bytes of "é" (U+00E9)."""
    token = engine.tokenizer.hf.convert_tokens_to_ids("Ã")   # byte 0xC3 in GPT-2's alphabet
    assert engine.tokenizer.decode([token]) == "\ufffd"       # half a character
    return token


def finish(engine, params: SamplingParams):
    outs = list(engine.add_request(PROMPT, params))
    tokens = [t for o in outs for t in o.token_ids]
    return tokens, "".join(o.text for o in outs), outs[-1].finish_reason


def test_a_character_cut_by_max_tokens_is_not_lost(engine, first_byte_of_e_acute):
    tokens, text, reason = finish(engine, SamplingParams(
        max_tokens=1, temperature=0.0, logit_bias={first_byte_of_e_acute: 100.0}))
    assert tokens == [first_byte_of_e_acute] and reason == "length"
    assert text == engine.tokenizer.decode(tokens) == "\ufffd"


def test_a_character_cut_by_a_stop_token_kept_in_the_output_is_not_lost(
        engine, first_byte_of_e_acute):
    tokens, text, reason = finish(engine, SamplingParams(
        max_tokens=4, temperature=0.0, logit_bias={first_byte_of_e_acute: 100.0},
        stop_token_ids=[first_byte_of_e_acute], include_stop_str_in_output=True))
    assert tokens == [first_byte_of_e_acute] and reason == "stop"
    assert text == engine.tokenizer.decode(tokens)
