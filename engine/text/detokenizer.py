"""Incremental detokenization: token ids in, newly completed text out.

Decoding one token at a time does not work: a byte-level BPE token can hold half of a
UTF-8 character, and how a token decodes can depend on its neighbours (SentencePiece
spaces). vLLM's technique keeps two offsets into the sequence's tokens:

    tokens:  ... | prefix_offset ........ read_offset ........ end
                   (context, already sent)   (not yet sent)

Each step decodes tokens[prefix_offset:read_offset] and tokens[prefix_offset:]; the
second text minus the first is the new text. While the new text ends in U+FFFD (a
character not yet complete) nothing is released and the offsets stay put, so the
window only ever moves forward over whole characters. Each step decodes a handful of
tokens, not the whole sequence.
"""

from __future__ import annotations

from engine.text.tokenizer import Tokenizer

# Prompt tokens before the output kept as decoding context (vLLM uses the same 5).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, one token at a time.

    The joined output of `add` plus `flush` equals `tokenizer.decode(output_ids,
    skip_special_tokens)` for byte-level BPE tokenizers; for SentencePiece ones whose
    decoder strips a leading space, the output keeps the space the prompt context gives
    it (" Paris" after "The capital is"), as vLLM does.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._hf = tokenizer.hf
        self._skip_ids = tokenizer.special_ids if skip_special_tokens else frozenset()
        context_ids = [i for i in prompt_ids[-_PROMPT_CONTEXT_TOKENS:] if i not in self._skip_ids]
        self._tokens: list[str] = self._hf.convert_ids_to_tokens(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it completes ("" if none yet)."""
        if token_id in self._skip_ids:
            return ""
        self._tokens.append(self._hf.convert_ids_to_tokens(token_id))
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""   # an incomplete character: wait for the bytes that finish it
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """The text still held back when the sequence ends: an incomplete character at
        the very end decodes to U+FFFD, as `tokenizer.decode` gives it."""
        prefix_text, new_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._tokens)
        return new_text[len(prefix_text):]

    def _decode_window(self) -> tuple[str, str]:
        to_string = self._hf.convert_tokens_to_string
        window = self._tokens[self._prefix_offset:]
        prefix_text = to_string(window[:self._read_offset - self._prefix_offset])
        return prefix_text, to_string(window)
