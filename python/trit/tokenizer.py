"""The model's tokenizer (`tokenizer.json`) and chat template, used the way
transformers uses them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HfTokenizer
from tokenizers.decoders import ByteLevel, DecodeStream

from trit._core import InvalidInputError
from trit.loader import read_json


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable character that
    stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encodes and decodes text, and renders chat templates."""

    def __init__(self, folder: Path) -> None:
        """The tokenizer of a model folder, or of a GGUF file's metadata."""
        if folder.is_file():
            from trit.gguf_tokenizer import read_gguf_tokenizer

            self._tok, self._config, self.chat_template = read_gguf_tokenizer(folder)
        else:
            path = folder / "tokenizer.json"
            if not path.exists():
                raise InvalidInputError(f"{path} does not exist")
            try:
                self._tok = _HfTokenizer.from_file(str(path))
            except Exception as exc:  # the tokenizers library raises plain Exceptions
                raise InvalidInputError(f"{path}: cannot load the tokenizer: {exc}") from exc
            config_path = folder / "tokenizer_config.json"
            self._config = read_json(config_path) if config_path.exists() else {}
            self.chat_template = self._find_template(folder)
        self.bos_token = _token_text(self._config.get("bos_token"))
        self.eos_token = _token_text(self._config.get("eos_token"))
        self._special_ids = {
            i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self._byte_alphabet = (
            _byte_level_alphabet() if isinstance(self._tok.decoder, ByteLevel) else None
        )

    def _find_template(self, folder: Path) -> str | None:
        template = self._config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token: int) -> bytes:
        """The bytes that token id `token` stands for in decoded text: with a
        byte-level BPE, a token can hold part of a UTF-8 character, which
        `decode([token])` would turn into U+FFFD. Special tokens give their text."""
        if token in self._special_ids:
            return self._special_ids[token].encode()
        piece = self._tok.id_to_token(token)
        if piece is None:
            raise InvalidInputError(f"token id {token} is not in the vocabulary")
        alphabet = self._byte_alphabet
        if alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return self.decode([token]).encode()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's
        post-processor (for Llama 3 style tokenizers: a leading BOS)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def stream(self, *, skip_special_tokens: bool = True) -> TextStream:
        return TextStream(self._tok, skip_special_tokens)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat template applied to `messages`, as transformers'
        `apply_chat_template(..., tokenize=False)` renders it."""
        if self.chat_template is None:
            raise InvalidInputError("this model's tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) for m in messages
        ):
            raise InvalidInputError("messages must be a list of dicts with role and content")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInputError(f"message {m!r} needs a str role and a str content")
        special = {
            key: _token_text(self._config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return _compile(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in special.items() if v is not None},
        )

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        # The template writes BOS itself, so no special tokens are added
        # (transformers' apply_chat_template does the same).
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class TextStream:
    """Turns token ids into text pieces as they arrive, holding back bytes of
    a UTF-8 character until the character is complete."""

    def __init__(self, tok: _HfTokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token: int) -> str:
        """The text completed by `token` (possibly empty)."""
        return self._stream.step(self._tok, token) or ""

    def feed(self, tokens: Iterable[int]) -> list[str]:
        return [self.step(t) for t in tokens]


def _compile(template: str) -> Any:
    """A Jinja template in the environment transformers renders chat templates in."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InvalidInputError(f"chat templates need jinja2: {exc}") from exc

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidInputError(f"the chat template does not compile: {exc}") from exc
