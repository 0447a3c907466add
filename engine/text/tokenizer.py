"""The model's tokenizer and its Hugging Face chat template.

`Tokenizer` wraps the fast tokenizer of a model directory (local files only) and renders
chat messages with the model's Jinja2 chat template exactly as transformers'
`apply_chat_template(..., tokenize=False)` does: the same sandboxed environment
(ImmutableSandboxedEnvironment, so a template cannot reach Python internals or the
filesystem), the same globals and filters, the same handling of reasoning fields and
`continue_final_message`. A rendered prompt already carries the template's special
tokens, so it is encoded with `add_special_tokens=False`, which is what
`apply_chat_template(tokenize=True)` does too (no second BOS).

Why not call `apply_chat_template` itself: a served checkpoint ships its own template,
which is untrusted input that must fail as a clear ValueError (a 400), not as whatever
transformers raises; the messages arrive as OpenAI JSON, whose reasoning fields
(`reasoning_content`, `reasoning`, `thinking`) different templates read under different
names; and the renderer is the one piece of transformers whose signature and return
type changed across major versions (4 -> 5). The environment is small and mirrors
transformers' own, and the tests keep `apply_chat_template` as the oracle, so a
divergence shows at once.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning trace goes by; templates read `reasoning_content` (Qwen3)
# or `thinking` (gpt-oss), so every name is filled from whichever the caller gave.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message to find where it ends in the rendered text.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Variables the renderer sets itself; template kwargs may not replace them.
_RESERVED_TEMPLATE_VARS = ("messages", "tools", "documents", "add_generation_prompt")


class Tokenizer:
    """The Hugging Face fast tokenizer of `model_dir`, plus chat-template rendering."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_token_id: int | None = self.hf.eos_token_id
        self.vocab_size: int = len(self.hf)
        # The ids `decode(..., skip_special_tokens=True)` drops: every added token marked
        # special (a superset of `all_special_ids` for many models).
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in self.hf.added_tokens_decoder.items() if tok.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of spaces: incremental detokenization cannot undo it token by token.
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def render_chat(self, messages: list[dict], /, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: list[dict] | None = None,
                    chat_template: str | None = None, **template_kwargs: Any) -> str:
        """Render `messages` (plain JSON data) with the chat template to prompt text.

        `chat_template` overrides the model's template (a checkpoint may carry its own).
        Raises ValueError for a model without a template, bad messages, or a template
        that rejects the conversation (its `raise_exception`).
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        reserved = sorted(set(template_kwargs) & set(_RESERVED_TEMPLATE_VARS))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
        template = self._resolve_template(chat_template, tools)
        chat = [_normalize_message(m) for m in messages]
        if not chat:
            raise ValueError("messages must not be empty")
        final_text = _tag_final_message(chat, template) if continue_final_message else None
        variables = {**self.hf.special_tokens_map, **template_kwargs}
        try:
            rendered = compile_chat_template(template).render(
                messages=chat, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:   # raise_exception, syntax and sandbox errors
            raise ValueError(f"chat template error: {exc}") from exc
        except Exception as exc:   # the template failed on the data it was given
            raise ValueError(f"chat template error: {type(exc).__name__}: {exc}") from exc
        return rendered if final_text is None else _cut_at_tag(rendered, final_text)

    def encode_chat(self, messages: list[dict], /, **render_kwargs: Any) -> list[int]:
        """Token ids of the rendered chat, equal to `apply_chat_template(tokenize=True)`."""
        return self.encode(self.render_chat(messages, **render_kwargs), add_special_tokens=False)

    def _resolve_template(self, chat_template: str | None, tools: list[dict] | None) -> str:
        own = self.hf.chat_template
        if isinstance(own, dict):   # named templates: "default", "tool_use", ...
            if chat_template in own:
                return own[chat_template]
            if chat_template is None:
                name = "tool_use" if tools is not None and "tool_use" in own else "default"
                if name not in own:
                    raise ValueError(f"the model has several chat templates and none is the "
                                     f"default: {sorted(own)}")
                return own[name]
        if chat_template is not None:
            return chat_template
        if not own:
            raise ValueError("this model has no chat template; use /v1/completions "
                             "or give the checkpoint a chat_template.jinja")
        return own


def _normalize_message(message: Any) -> dict:
    """Drop None-valued keys (templates choke on them, as transformers notes), flatten text
    content parts to one string, and fill every reasoning field name from the given one."""
    if not isinstance(message, dict):
        raise ValueError(f"each message must be an object, got {type(message).__name__}")
    msg = {k: v for k, v in message.items() if v is not None}
    if isinstance(msg.get("content"), list):
        msg["content"] = _flatten_content(msg["content"])
    reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def _flatten_content(parts: list) -> str:
    # vLLM's choice: text parts joined by newlines.
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str):
            raise ValueError('content parts must be {"type": "text", "text": "..."}; '
                             f"got {part!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _tag_final_message(chat: list[dict], template: str) -> str:
    """Mark the end of the final message so the text after it can be cut off; return it."""
    final = chat[-1].get("content")
    if not isinstance(final, str):
        raise ValueError("continue_final_message needs a final message with text content")
    if "content" not in template:
        raise ValueError("continue_final_message: this chat template does not read `content`")
    chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
    return final


def _cut_at_tag(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message: the chat template dropped part of the final "
                         "message, so it cannot be continued")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()   # the template trimmed the message's trailing space


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own tojson, no HTML escaping, and json.dumps' options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateDict:
    """`dict(...)` for templates, without attribute access to the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:   # Jinja's signature trick: no `self`
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)
