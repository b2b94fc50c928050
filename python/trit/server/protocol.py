"""OpenAI's HTTP protocol, as trit serves it: request bodies checked field by
field (each error names its field), and the bodies of responses, stream
chunks and log-probs. Pure functions of plain values: no server, no model."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import numpy.typing as npt
from jinja2 import TemplateError

from trit._core import InvalidInputError
from trit.sampling import SamplingOptions

if TYPE_CHECKING:
    from trit.generator import Generator

log = logging.getLogger("trit.server")

MAX_STOP = 32
MAX_STOP_CHARS = 256  # per stop string: each generated token is checked against every prefix of it
MAX_JSON_DEPTH = 32  # nesting of the request body; a real request needs about 6
MAX_REPETITION_PENALTY = 100.0  # and 1 / 100 at the low end: both far beyond any useful value
MAX_SHOWN = 80  # characters of a value quoted back in an error message
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions

# finish reasons of Generator.last_stats -> OpenAI's
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}

# The request fields read. Any other field (tools, response_format, ...) that
# is not null gets a 400 naming it; some of these take only their default
# value (n: 1, logit_bias: {}, frequency_penalty: 0, ...).
_COMMON_FIELDS = {
    *("model", "max_tokens", "temperature", "top_p", "seed", "stop", "n"),
    *("stream", "stream_options", "frequency_penalty", "presence_penalty", "logit_bias"),
    # trit's own sampling options, beyond OpenAI's (the openai client sends them as extra_body)
    *("top_k", "min_p", "repetition_penalty"),
    # accepted and ignored: they do not change the output
    *("user", "metadata", "store", "service_tier"),
}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_MESSAGE_ROLES = {"system", "developer", "user", "assistant"}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for one of `GenerationStats.finish_reason`."""
    return _FINISH.get(reason, "stop")


# ---------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    """A 400 about the request field `param`."""
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    """A 500: the details go to the server's log, never to the client."""
    return APIError(500, "internal error", type="server_error")


def _shown(value: Any) -> str:
    """`value` as JSON, cut to MAX_SHOWN characters: an error message quotes
    what it refuses without echoing a whole request back."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _cut(name: str) -> str:
    return name if len(name) <= MAX_SHOWN else name[: MAX_SHOWN - 3] + "..."


# ---------------------------------------------------------------------------
# The request body


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, refused with a 400 unless it is
    one: invalid JSON, nesting deeper than MAX_JSON_DEPTH, or a string (a
    value or a key) that is not Unicode text, such as a lone surrogate
    ("\\ud800"), which JSON allows but no tokenizer or UTF-8 encoder takes."""
    try:
        body = json.loads(raw)
    except RecursionError:  # json's parser recurses per level: the limit ends it
        raise invalid(
            f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise invalid(f"the request body is not valid JSON: {exc}", None) from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    _check_json_values(body)
    return body


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else ("." if out else "") + _cut(key)
    return out


def _check_json_values(body: dict[str, Any]) -> None:
    """Walks the parsed body without recursion: its depth, and that every
    string encodes as UTF-8. The error names the top-level field."""

    def bad_text(path: tuple[str | int, ...]) -> APIError:
        param = path[0] if path and isinstance(path[0], str) and _is_text(path[0]) else None
        where = _where(path) if param is not None else "a field name"
        return invalid(f"{where} is not valid Unicode text (it holds a lone surrogate)", param)

    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            param = path[0] if isinstance(path[0], str) and _is_text(path[0]) else None
            raise invalid(
                f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", param
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not _is_text(key):
                raise bad_text(path)
            if isinstance(item, str):
                if not _is_text(item):
                    raise bad_text((*path, key))
            elif isinstance(item, (dict, list)):
                stack.append((item, (*path, key)))


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Request parsing: plain dicts, checked field by field so that each error
# names its field. Parsing is cheap and bounded (no tokenizing): the server
# parses before it admits a request, and tokenizes after (ParsedRequest.tokenize).


@dataclass(frozen=True)
class PromptContext:
    """What parsing a request needs of the model: its context size and
    vocabulary, and its tokenizer."""

    n_ctx: int
    vocab_size: int
    max_token_bytes: int
    """The most bytes of text one token stands for: a prompt of B bytes is
    at least B / max_token_bytes tokens, which refuses a prompt that cannot
    fit the context before it is tokenized. (This holds for tokenizers that
    keep every byte of the text, as byte-level BPE does.)"""
    encode: Callable[[str], list[int]]
    """A prompt's token ids, as the tokenizer adds special tokens by default."""
    encode_chat: Callable[[list[dict[str, Any]]], list[int]]
    """Messages rendered with the chat template, as token ids."""

    @classmethod
    def of(cls, g: Generator) -> PromptContext:
        vocab = g.config.vocab_size
        return cls(
            g.n_ctx,
            vocab,
            longest_token_bytes(g.tokenizer.token_bytes, vocab),
            g.encode,
            g.tokenizer.encode_chat,
        )

    @property
    def max_prompt_bytes(self) -> int:
        """Longer prompts (in UTF-8 bytes) cannot fit the context."""
        return self.n_ctx * self.max_token_bytes


def longest_token_bytes(token_bytes: Callable[[int], bytes], vocab_size: int) -> int:
    """The most bytes any token id below `vocab_size` stands for (at least
    4, one UTF-8 character, for tokenizers that map text to ids otherwise)."""
    longest = 4
    for token in range(vocab_size):
        try:
            longest = max(longest, len(token_bytes(token)))
        except InvalidInputError:  # an id the tokenizer does not use
            continue
    return longest


@dataclass
class GenerationRequest:
    """What to generate: the validated fields common to both endpoints."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    logprobs: int | None
    """How many alternatives to report per token (0: only the chosen one); None: no log-probs."""


@dataclass
class ParsedRequest:
    """A request whose fields are all checked and whose prompt is known to
    be small enough to tokenize: `tokenize` makes it a GenerationRequest
    (the heavy step, done once the server has admitted the request)."""

    ctx: PromptContext
    prompt: Callable[[], list[int]]
    """The prompt's token ids: tokenizes, or renders the chat template."""
    param: str
    """The field holding the prompt: "messages" or "prompt"."""
    max_tokens: int | None
    """None: up to the end of the context."""
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    logprobs: int | None

    def tokenize(self) -> GenerationRequest:
        ids = self.prompt()
        if not ids:
            raise invalid("the prompt has no tokens", self.param)
        n_ctx = self.ctx.n_ctx
        if len(ids) > n_ctx:
            raise _too_long(n_ctx, self.param, f"{len(ids)} tokens")
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = max(n_ctx - len(ids), 1)
        return GenerationRequest(
            ids, max_tokens, self.sampling, self.stream, self.include_usage, self.logprobs
        )


def _too_long(n_ctx: int, param: str, size: str) -> APIError:
    return invalid(
        f"This model's maximum context length is {n_ctx} tokens. "
        f"However, your {'messages' if param == 'messages' else 'prompt'} resulted in {size}.",
        param,
        "context_length_exceeded",
    )


def _check_prompt_bytes(ctx: PromptContext, n_bytes: int, param: str) -> None:
    """Refuses a prompt whose byte length alone shows that it cannot fit."""
    if n_bytes > ctx.max_prompt_bytes:
        at_least = -(-n_bytes // ctx.max_token_bytes)
        raise _too_long(ctx.n_ctx, param, f"at least {at_least} tokens ({n_bytes} bytes)")


def check_model(body: dict[str, Any], model_name: str) -> None:
    """The request names the model this server has: a 400 if it names none,
    a 404 if another."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("`model` must be given: this server has " + repr(model_name), "model")
    if model != model_name:
        raise APIError(
            404,
            f"The model `{_cut(model)}` does not exist: this server has `{model_name}`.",
            param="model",
            code="model_not_found",
        )


def _get(body: dict[str, Any], name: str) -> Any:
    """The field's value; null counts as absent."""
    return body.get(name)


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    *,
    lo: float,
    hi: float = math.inf,
    lo_open: bool = False,
) -> float:
    v = _get(body, name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"`{name}` must be a number, got {_shown(v)}", name)
    try:
        x = float(v)  # an integer beyond float's range does not convert
    except OverflowError:
        x = math.inf if v > 0 else -math.inf
    if not math.isfinite(x) or x < lo or (lo_open and x == lo) or x > hi:
        left = "(" if lo_open else "["
        right = "]" if hi != math.inf else ")"
        raise invalid(f"`{name}` must be in {left}{lo:g}, {hi:g}{right}, got {_shown(v)}", name)
    return x


def _integer(
    body: dict[str, Any], name: str, default: int | None, *, lo: int, hi: int | None = None
) -> int | None:
    v = _get(body, name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"`{name}` must be an integer, got {_shown(v)}", name)
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise invalid(f"`{name}` must be {bound}, got {_shown(v)}", name)
    return v


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = _get(body, name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"`{name}` must be true or false, got {_shown(v)}", name)
    return v


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name, value in body.items():
        if name not in known:
            if value is None:
                continue  # an explicit null asks for nothing
            raise invalid(f"trit does not support the request field `{_cut(name)}`", _cut(name))
    if _get(body, "logit_bias"):
        raise invalid("trit does not support `logit_bias`", "logit_bias")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _get(body, name)
        if v is not None and v != 0:
            raise invalid(
                f"trit does not support `{name}`; it offers `repetition_penalty` "
                "(multiplicative, as transformers; 1 is off) as an extra field",
                name,
            )
    n = _integer(body, "n", 1, lo=1)
    if n != 1:
        raise invalid("trit generates one choice per request: `n` must be 1", "n")


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop")


def _sampling(body: dict[str, Any]) -> SamplingOptions:
    """The sampling fields, in OpenAI's ranges (temperature up to 2) and
    trit's extra ones; an unseeded request samples with a random seed."""
    seed = _integer(body, "seed", None, lo=-(1 << 63), hi=(1 << 64) - 1)
    stop = _get(body, "stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise invalid("`stop` must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise invalid(
            f"`stop` takes at most {MAX_STOP} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            "stop",
        )
    penalty = (1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    try:
        return SamplingOptions(
            temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
            top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
            top_k=_integer(body, "top_k", 0, lo=0, hi=(1 << 63) - 1) or 0,
            min_p=_number(body, "min_p", 0.0, lo=0.0, hi=1.0),
            repetition_penalty=_number(
                body, "repetition_penalty", 1.0, lo=penalty[0], hi=penalty[1]
            ),
            # OpenAI's seeds are signed 64-bit: the same bits as the engine's unsigned one.
            seed=None if seed is None else seed & ((1 << 64) - 1),
            stop=stops,
        )
    except InvalidInputError as exc:  # in range as a float64, not as the engine's float32
        message = str(exc)
        param = next((f for f in _SAMPLING_FIELDS if message.startswith(f)), None)
        raise invalid(message, param) from exc


def _parsed(
    body: dict[str, Any],
    ctx: PromptContext,
    prompt: Callable[[], list[int]],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param: str,
) -> ParsedRequest:
    """Checks the fields both endpoints share. `param` names the prompt's field."""
    sampling = _sampling(body)
    stream = _boolean(body, "stream")
    options = _get(body, "stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("`stream_options` is only allowed with `stream: true`", "stream_options")
        if not isinstance(options, dict):
            raise invalid("`stream_options` must be an object", "stream_options")
        include_usage = _boolean(options, "include_usage")
    return ParsedRequest(ctx, prompt, param, max_tokens, sampling, stream, include_usage, logprobs)


def _max_tokens(
    body: dict[str, Any], ctx: PromptContext, name: str, default: int | None
) -> int | None:
    """A reply cannot be longer than the context."""
    return _integer(body, name, default, lo=1, hi=ctx.n_ctx)


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(
                    f"{where}.content[{j}]: trit takes only text parts, got {_shown(kind)}",
                    "messages",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.content[{j}].text must be a string", "messages")
            parts.append(text)
        return "".join(parts)
    raise invalid(f"{where}.content must be a string or a list of text parts", "messages")


def parse_chat(body: dict[str, Any], ctx: PromptContext) -> ParsedRequest:
    """Validates a /v1/chat/completions body; its `tokenize` renders the prompt."""
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list of messages", "messages")
    if len(messages) > ctx.n_ctx:  # every message takes at least one token
        raise _too_long(ctx.n_ctx, "messages", f"at least {len(messages)} tokens")
    rendered = []
    n_bytes = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with role and content", "messages")
        for key, value in m.items():
            # Clients send back whole assistant messages: "refusal": null,
            # "tool_calls": [] ... ask for nothing.
            if key not in ("role", "content", "name") and value not in (None, [], {}, ""):
                raise invalid(
                    f"{where}: trit does not support `{_cut(key)}` in messages", "messages"
                )
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise invalid(
                f"{where}.role must be one of {', '.join(sorted(_MESSAGE_ROLES))}, "
                f"got {_shown(role)}",
                "messages",
            )
        content = _message_text(m.get("content"), where)
        n_bytes += len(content.encode())
        rendered.append({"role": "system" if role == "developer" else role, "content": content})
    _check_prompt_bytes(ctx, n_bytes, "messages")
    max_tokens = _max_tokens(body, ctx, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _max_tokens(body, ctx, "max_tokens", None)
    logprobs = None
    top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if _boolean(body, "logprobs"):
        logprobs = top or 0
    elif top is not None:
        raise invalid("`top_logprobs` needs `logprobs: true`", "top_logprobs")

    def prompt() -> list[int]:
        return _render_chat(ctx, rendered)

    return _parsed(body, ctx, prompt, max_tokens=max_tokens, logprobs=logprobs, param="messages")


def _render_chat(ctx: PromptContext, messages: list[dict[str, Any]]) -> list[int]:
    """The messages through the chat template, as token ids. A template is
    a program from the model's folder: whatever it raises refuses these
    messages (a 400), as transformers does; it does not fail the server."""
    try:
        return ctx.encode_chat(messages)
    except InvalidInputError as exc:  # no template, or the tokenizer refused the text
        raise invalid(f"cannot apply the chat template: {_cut(str(exc))}", "messages") from exc
    except TemplateError as exc:  # the template's raise_exception, or a template bug
        raise invalid(
            f"the chat template refused these messages: {_cut(str(exc))}", "messages"
        ) from exc
    except Exception as exc:  # a Python error inside the template's code
        log.warning("the chat template failed: %r", exc)
        raise invalid(
            f"the chat template failed on these messages ({type(exc).__name__})", "messages"
        ) from exc


def parse_completion(body: dict[str, Any], ctx: PromptContext) -> ParsedRequest:
    """Validates a /v1/completions body; its `tokenize` tokenizes the prompt."""
    _check_fields(body, _COMPLETION_FIELDS)
    if _boolean(body, "echo"):
        raise invalid("trit does not support `echo`", "echo")
    if _get(body, "suffix") is not None:
        raise invalid("trit does not support `suffix` (insertion)", "suffix")
    if _integer(body, "best_of", 1, lo=1) != 1:
        raise invalid("trit does not support `best_of` > 1", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    vocab = ctx.vocab_size
    tokens: Callable[[], list[int]]
    if isinstance(prompt, str):
        _check_prompt_bytes(ctx, len(prompt.encode()), "prompt")
        text = prompt

        def tokens() -> list[int]:
            return ctx.encode(text)

    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise invalid(
                f"token id {_shown(bad[0])} is outside the vocabulary [0, {vocab})", "prompt"
            )
        if len(prompt) > ctx.n_ctx:
            raise _too_long(ctx.n_ctx, "prompt", f"{len(prompt)} tokens")
        ids = list(prompt)

        def tokens() -> list[int]:
            return ids

    elif isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("trit takes one prompt per request", "prompt")
    else:
        raise invalid("`prompt` must be a string or a non-empty list of token ids", "prompt")
    max_tokens = _max_tokens(body, ctx, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
    return _parsed(body, ctx, tokens, max_tokens=max_tokens, logprobs=logprobs, param="prompt")


# ---------------------------------------------------------------------------
# Log-probs


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


def token_logprob(token: int, logits: npt.NDArray[np.float32], top: int) -> TokenLogprob:
    """log-softmax of the raw logits the token was sampled from (before
    temperature, top-p and the other filters, as OpenAI reports them)."""
    x = logits.astype(np.float64)
    m = float(x.max())
    # -inf (a masked logit) is not JSON: floor at -9999, as OpenAI does.
    lp = np.maximum(x - (m + math.log(float(np.exp(x - m).sum()))), -9999.0)
    best: list[tuple[int, float]] = []
    if top:
        idx = np.argpartition(-lp, top - 1)[:top]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(token, float(lp[token]), best)


class TokenText:
    """Token ids -> the strings and bytes OpenAI's log-probs show, given the
    tokenizer's `token_bytes`."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            raw = self._token_bytes(token)
            self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token]


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText) -> dict[str, Any]:
    content = []
    for e in entries:
        s, b = text(e.token)
        top = []
        for t, lp in e.top:
            ts, tb = text(t)
            top.append({"token": ts, "logprob": lp, "bytes": tb})
        content.append({"token": s, "logprob": e.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob], text: TokenText, offset: int
) -> dict[str, Any]:
    """The legacy format; `offset` is the text offset of the first entry."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        s = text(e.token)[0]
        tokens.append(s)
        token_logprobs.append(e.logprob)
        tops.append({text(t)[0]: lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Responses:
    """The bodies of one served model's responses and stream chunks.
    `created` is the time (s) the chunks and completions carry."""

    model_name: str
    fingerprint: str
    n_ctx: int

    def _head(self, cid: str, kind: str, created: int) -> dict[str, Any]:
        return {
            "id": cid,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
        }

    def chat_chunk(self, cid: str, choice: dict[str, Any], created: int) -> dict[str, Any]:
        """A chunk of a streamed chat completion: one choice, or none (`{}`,
        for the usage chunk)."""
        choices = [choice] if choice else []
        return {**self._head(cid, "chat.completion.chunk", created), "choices": choices}

    def chat_completion(
        self,
        cid: str,
        text: str,
        logprobs: dict[str, Any] | None,
        finish: str,
        usage: dict[str, int],
        created: int,
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return {**self._head(cid, "chat.completion", created), "choices": [choice], "usage": usage}

    def completion_chunk(
        self, cid: str, choices: list[dict[str, Any]], created: int
    ) -> dict[str, Any]:
        """A streamed chunk or (with usage added) a whole completion: both
        are "text_completion" objects."""
        return {**self._head(cid, "text_completion", created), "choices": choices}

    def model_card(self, created: int) -> dict[str, Any]:
        # max_model_len, as vLLM: the context size, which bounds max_tokens
        return {
            "id": self.model_name,
            "object": "model",
            "created": created,
            "owned_by": "trit",
            "max_model_len": self.n_ctx,
        }
