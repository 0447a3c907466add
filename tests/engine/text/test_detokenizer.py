"""Incremental detokenization: joined pieces equal tokenizer.decode, and no piece ever
carries half a UTF-8 character. Oracle: the tokenizer's own decode of all ids at once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The answer is 42.",
    "naïve café, Ünïcödé — “quotes”",
    "中文字符和日本語のテキスト",
    "emoji 😀🎉 family 👨‍👩‍👧 flag 🇫🇷 done",
    "mixed: a😀b你c é\n\n  indented\tcode()",
]


def stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


def assert_streams_like_decode(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> None:
    for skip in (True, False):
        pieces = stream(tok, prompt_ids, ids, skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def smol(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The default model's byte-level BPE tokenizer, plus Qwen-style <think> added tokens."""
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    hf.add_tokens(["<think>", "</think>"])
    out = tmp_path_factory.mktemp("smol_think")
    hf.save_pretrained(out)
    return Tokenizer(out)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A SentencePiece-style BPE (▁ for spaces, BOS added) whose vocabulary lacks every
    non-Latin character, so those come out as <0xNN> byte-fallback tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:é":
        vocab[ch] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁", "c")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    out = tmp_path_factory.mktemp("byte_fallback")
    hf.save_pretrained(out)
    return Tokenizer(out)


@pytest.mark.model
@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_decode_without_broken_characters(smol, text) -> None:
    ids = smol.encode(text, add_special_tokens=False)
    assert_streams_like_decode(smol, [], ids)
    assert_streams_like_decode(smol, smol.encode_chat([{"role": "user", "content": "hi"}]), ids)


@pytest.mark.model
def test_emoji_and_cjk_are_split_across_byte_level_tokens(smol) -> None:
    # The property the streaming tests rely on: some tokens hold part of a character.
    for text in TEXTS[2:4]:
        ids = smol.encode(text, add_special_tokens=False)
        assert any("\ufffd" in smol.decode([i]) for i in ids)


@pytest.mark.model
def test_special_and_added_tokens_inside_output(smol) -> None:
    im_end = smol.hf.convert_tokens_to_ids("<|im_end|>")
    think = smol.encode("<think>\nhmm 😀\n</think>\n\nAnswer: 你好", add_special_tokens=False)
    assert smol.hf.convert_tokens_to_ids("<think>") in think
    ids = think + [im_end] + smol.encode(" more", add_special_tokens=False) + [im_end]
    assert_streams_like_decode(smol, [], ids)
    assert "".join(stream(smol, [], ids, skip=True)).count("<|im_end|>") == 0


@pytest.mark.model
def test_random_token_ids_stream_equals_decode(smol) -> None:
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(smol.vocab_size) for _ in range(200)]
        assert_streams_like_decode(smol, [rng.randrange(smol.vocab_size) for _ in range(8)], ids)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_stream_equals_decode_without_broken_characters(byte_fallback, text) -> None:
    ids = byte_fallback.encode(text, add_special_tokens=False)
    byte_tokens = [t for t in byte_fallback.hf.convert_ids_to_tokens(ids) if t.startswith("<0x")]
    assert bool(byte_tokens) == any(ch != "é" and not ch.isascii() for ch in text)
    prompt = byte_fallback.encode("Say:")
    assert prompt[0] == 1   # the BOS in the context is skipped, not decoded
    assert_streams_like_decode(byte_fallback, prompt, ids)


def test_each_character_is_released_with_the_token_that_completes_it(byte_fallback) -> None:
    ids = byte_fallback.encode("a😀", add_special_tokens=False)   # ▁, a, then 4 byte tokens
    assert len(ids) == 6
    assert stream(byte_fallback, [], ids) == [" ", "a", "", "", "", "😀", ""]


def test_incomplete_character_at_the_end_comes_out_of_flush_as_decode_gives_it(byte_fallback) -> None:
    ids = byte_fallback.encode("ok 你", add_special_tokens=False)[:-1]   # drop the last byte
    pieces = stream(byte_fallback, [], ids)
    assert all("\ufffd" not in p for p in pieces[:-1])
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == byte_fallback.decode(ids)


def test_skipped_special_tokens_release_nothing(byte_fallback) -> None:
    detok = IncrementalDetokenizer(byte_fallback, [1], skip_special_tokens=True)
    assert detok.add(2) == ""
    detok = IncrementalDetokenizer(byte_fallback, [1], skip_special_tokens=False)
    assert detok.add(2) == "</s>"
