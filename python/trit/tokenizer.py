"""The model's tokenizer (`tokenizer.json`) and chat template, used the way
transformers uses them."""

from __future__ import annotations

import json
import operator
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from tokenizers import Tokenizer as _HfTokenizer
from tokenizers.decoders import ByteLevel, DecodeStream

from trit._core import MAX_TOKENIZER_BYTES, InvalidInputError, check_model_file
from trit.loader import read_json, read_text

# Bounds on rendering a chat template (it comes with the model, so it is
# untrusted): the time, and the text beyond what the messages bring.
RENDER_SECONDS = 5.0
RENDER_EXTRA_CHARS = 1 << 20
# Token ids are u32 in the tokenizers library and in the engine.
_MAX_TOKEN_ID = (1 << 32) - 1


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
            check_model_file(path, MAX_TOKENIZER_BYTES)
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
            template = read_text(jinja_file)
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise InvalidInputError(f"token must be a str, got {type(token).__name__}")
        _check_unicode(token, "token")
        return self._tok.token_to_id(token)

    def token_bytes(self, token: int) -> bytes:
        """The bytes that token id `token` stands for in decoded text: with a
        byte-level BPE, a token can hold part of a UTF-8 character, which
        `decode([token])` would turn into U+FFFD. Special tokens give their text."""
        _check_ids([token])
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
        _check_unicode(text, "text")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = _check_ids(ids)
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

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
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInputError(f"message {i} needs a str role and a str content")
            _check_unicode(m["role"], f"the role of message {i}")
            _check_unicode(m["content"], f"the content of message {i}")
        special = {
            key: _token_text(self._config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return _render(
            _compile(self.chat_template),
            max_chars=RENDER_EXTRA_CHARS + 2 * sum(len(m["content"]) for m in messages),
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in special.items() if v is not None},
        )

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        # The template writes BOS itself, so no special tokens are added
        # (transformers' apply_chat_template does the same).
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _check_unicode(text: str, what: str) -> None:
    """Refuses a str that is not valid Unicode text (a lone surrogate, as
    from `"\\ud800"` or a JSON `"\\ud800"` escape): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} holds a lone surrogate (U+{ord(text[exc.start]):04X}) at position "
            f"{exc.start}, which is not valid Unicode text"
        ) from None


def _check_ids(ids: Any) -> list[int]:
    """`ids` as a list of token ids (ints from 0 to 2**32 - 1)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"token ids must be a list of ints, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise InvalidInputError(
                f"token id at position {i} is a {type(t).__name__}, not an int"
            ) from None
        if not 0 <= t <= _MAX_TOKEN_ID:
            raise InvalidInputError(f"token id at position {i} is {t}, not from 0 to 2**32 - 1")
        out.append(t)
    return out


class _RenderTooCostly(Exception):
    pass


def _render(template: Any, *, max_chars: int, **context: Any) -> str:
    """`template` rendered with `context`, within RENDER_SECONDS and
    `max_chars` characters; an InvalidInputError otherwise, and for any
    error the template raises (`raise_exception`, a bad filter...).

    The time bound is a trace function on this thread, which sees each line
    the compiled template runs (loops included), so even a template that
    loops without output is stopped."""
    import jinja2

    deadline = time.monotonic() + RENDER_SECONDS

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderTooCostly(f"it ran for more than {RENDER_SECONDS:g} s")
        return trace

    pieces: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > max_chars:
                raise _RenderTooCostly(f"its output passed {max_chars} characters")
            pieces.append(piece)
    except _RenderTooCostly as exc:
        raise InvalidInputError(f"the chat template was stopped: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidInputError(f"the chat template refused these messages: {exc}") from None
    except (MemoryError, RecursionError) as exc:
        raise InvalidInputError(f"the chat template was stopped: {type(exc).__name__}") from None
    except Exception as exc:  # a template can fail in any Python way
        raise InvalidInputError(
            f"the chat template failed to render: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """Refuses the one-operation blow-ups a trace function cannot stop
        (they run in C): a huge repetition or power."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        if len(seq) * n > RENDER_EXTRA_CHARS:
                            raise jinja2.exceptions.SecurityError("repetition too large")
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() * right > RENDER_EXTRA_CHARS
            ):
                raise jinja2.exceptions.SecurityError("power too large")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except (jinja2.exceptions.TemplateError, RecursionError) as exc:
        raise InvalidInputError(f"the chat template does not compile: {exc}") from None
