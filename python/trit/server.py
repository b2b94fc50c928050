"""`trit serve`: an OpenAI-compatible HTTP server for one Generator.

    app = create_app(generator, model_name="bitnet-2b")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streamed as
server-sent events with `"stream": true`), GET /v1/models, GET /health.

One Generator holds one model and one KV cache, so requests are served one at
a time (queued, not batched): a FIFO queue admits at most `max_concurrency`
requests, running and waiting together; one more gets a 503. Generation runs in
a worker thread (the engine releases the GIL), so the event loop stays free for
/health and for new requests, and a client that goes away is noticed at once:
its generation stops at the next token.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
Request fields that trit does not implement (tools, response_format, n > 1, ...)
are refused with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from trit._core import InvalidInputError, __version__
from trit.generator import Generator

log = logging.getLogger("trit.server")

MAX_BODY_BYTES = 16 << 20
"""Larger request bodies get a 413 (a full 128k-token prompt is about 0.5 MiB)."""
MAX_STOP = 32
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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------
# Request parsing: plain dicts, checked field by field so that each error
# names its field.


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
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _invalid(f"`{name}` must be a number, got {json.dumps(v)}", name)
    if v < lo or (lo_open and v == lo) or v > hi:
        left = "(" if lo_open else "["
        right = "]" if hi != math.inf else ")"
        raise _invalid(f"`{name}` must be in {left}{lo:g}, {hi:g}{right}, got {v:g}", name)
    return float(v)


def _integer(
    body: dict[str, Any], name: str, default: int | None, *, lo: int, hi: int | None = None
) -> int | None:
    v = _get(body, name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _invalid(f"`{name}` must be an integer, got {json.dumps(v)}", name)
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise _invalid(f"`{name}` must be {bound}, got {v}", name)
    return v


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = _get(body, name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _invalid(f"`{name}` must be true or false, got {json.dumps(v)}", name)
    return v


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name, value in body.items():
        if name not in known:
            if value is None:
                continue  # an explicit null asks for nothing
            raise _invalid(f"trit does not support the request field `{name}`", name)
    if _get(body, "logit_bias"):
        raise _invalid("trit does not support `logit_bias`", "logit_bias")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _get(body, name)
        if v is not None and v != 0:
            raise _invalid(
                f"trit does not support `{name}`; it offers `repetition_penalty` "
                "(multiplicative, as transformers; 1 is off) as an extra field",
                name,
            )
    n = _integer(body, "n", 1, lo=1)
    if n != 1:
        raise _invalid("trit generates one choice per request: `n` must be 1", "n")


@dataclass
class GenerationRequest:
    """What to generate: the validated fields common to both endpoints."""

    ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool
    logprobs: int | None
    """How many alternatives to report per token (0: only the chosen one); None: no log-probs."""


def _request(
    body: dict[str, Any],
    g: Generator,
    ids: list[int],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param: str,
) -> GenerationRequest:
    """Checks the prompt's length (`param` names it) and the fields both
    endpoints share. `max_tokens` None: up to the end of the context."""
    if not ids:
        raise _invalid("the prompt has no tokens", param)
    if len(ids) > g.n_ctx:
        raise _invalid(
            f"This model's maximum context length is {g.n_ctx} tokens. "
            f"However, your {'messages' if param == 'messages' else 'prompt'} resulted in "
            f"{len(ids)} tokens.",
            param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = max(g.n_ctx - len(ids), 1)
    sampling: dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, lo=0.0, hi=2.0),
        "top_p": _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        "top_k": _integer(body, "top_k", 0, lo=0),
        "min_p": _number(body, "min_p", 0.0, lo=0.0, hi=1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, lo=0.0, lo_open=True),
    }
    seed = _integer(body, "seed", None, lo=-(1 << 63), hi=(1 << 64) - 1)
    sampling["seed"] = None if seed is None else seed & ((1 << 64) - 1)
    stop = _get(body, "stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _invalid("`stop` must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or not all(stops):
        raise _invalid(f"`stop` takes at most {MAX_STOP} non-empty strings", "stop")
    sampling["stop"] = stops
    stream = _boolean(body, "stream")
    options = _get(body, "stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("`stream_options` is only allowed with `stream: true`", "stream_options")
        if not isinstance(options, dict):
            raise _invalid("`stream_options` must be an object", "stream_options")
        include_usage = _boolean(options, "include_usage")
    return GenerationRequest(ids, max_tokens, sampling, stream, include_usage, logprobs)


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _invalid(
                    f"{where}.content[{j}]: trit takes only text parts, got {kind!r}", "messages"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}.content[{j}].text must be a string", "messages")
            parts.append(text)
        return "".join(parts)
    raise _invalid(f"{where}.content must be a string or a list of text parts", "messages")


def parse_chat(body: dict[str, Any], g: Generator) -> GenerationRequest:
    """Validates a /v1/chat/completions body and renders its prompt."""
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list of messages", "messages")
    rendered = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(f"{where} must be an object with role and content", "messages")
        for key, value in m.items():
            # Clients send back whole assistant messages: "refusal": null,
            # "tool_calls": [] ... ask for nothing.
            if key not in ("role", "content", "name") and value not in (None, [], {}, ""):
                raise _invalid(f"{where}: trit does not support `{key}` in messages", "messages")
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise _invalid(
                f"{where}.role must be one of {', '.join(sorted(_MESSAGE_ROLES))}, got {role!r}",
                "messages",
            )
        content = _message_text(m.get("content"), where)
        rendered.append({"role": "system" if role == "developer" else role, "content": content})
    try:
        ids = g.tokenizer.encode_chat(rendered)
    except InvalidInputError as exc:  # no template, or the template refused the messages
        raise _invalid(f"cannot apply the chat template: {exc}", "messages") from exc
    max_tokens = _integer(body, "max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, lo=1)
    logprobs = None
    top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if _boolean(body, "logprobs"):
        logprobs = top or 0
    elif top is not None:
        raise _invalid("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    return _request(body, g, ids, max_tokens=max_tokens, logprobs=logprobs, param="messages")


def parse_completion(body: dict[str, Any], g: Generator) -> GenerationRequest:
    """Validates a /v1/completions body and tokenizes its prompt."""
    _check_fields(body, _COMPLETION_FIELDS)
    if _boolean(body, "echo"):
        raise _invalid("trit does not support `echo`", "echo")
    if _get(body, "suffix") is not None:
        raise _invalid("trit does not support `suffix` (insertion)", "suffix")
    if _integer(body, "best_of", 1, lo=1) != 1:
        raise _invalid("trit does not support `best_of` > 1", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    vocab = g.config.vocab_size
    if isinstance(prompt, str):
        ids = g.encode(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise _invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _invalid("trit takes one prompt per request", "prompt")
    else:
        raise _invalid("`prompt` must be a string or a non-empty list of token ids", "prompt")
    max_tokens = _integer(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, lo=1)
    logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
    return _request(body, g, ids, max_tokens=max_tokens, logprobs=logprobs, param="prompt")


# ---------------------------------------------------------------------------
# Log-probs


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


def _token_logprob(token: int, logits: npt.NDArray[np.float32], top: int) -> TokenLogprob:
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


class _TokenText:
    """Token ids -> the strings and bytes OpenAI's log-probs show."""

    def __init__(self, g: Generator) -> None:
        self._tokenizer = g.tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            raw = self._tokenizer.token_bytes(token)
            self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token]


def _chat_logprobs(entries: Sequence[TokenLogprob], text: _TokenText) -> dict[str, Any]:
    content = []
    for e in entries:
        s, b = text(e.token)
        top = []
        for t, lp in e.top:
            ts, tb = text(t)
            top.append({"token": ts, "logprob": lp, "bytes": tb})
        content.append({"token": s, "logprob": e.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content, "refusal": None}


def _completion_logprobs(
    entries: Sequence[TokenLogprob], text: _TokenText, offset: int
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
# The queue: one generation at a time, in arrival order, in one worker thread.


@dataclass
class Piece:
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob]  # of tokens whose text was never emitted (a cut stop string)


@dataclass
class Failed:
    error: APIError


Event = Union[Piece, Done, Failed]


class _Cancelled(Exception):
    """Raised in the worker thread to end a generation whose client left."""


class Job:
    """One request: waits its turn in the queue, then generates in the
    worker thread and hands its events to the event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: no more events
        self._loop = loop

    def emit(self, event: Event | None) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()

    async def stream(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            if event is None:
                return
            yield event


class Scheduler:
    """A fair (FIFO) queue in front of one Generator. All its state lives on
    the event loop's thread; only `_run` runs in the worker thread."""

    def __init__(self, generator: Generator, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.generator = generator
        self.max_concurrency = max_concurrency
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trit-generate")

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return 0 if self._running is None else 1

    def submit(self, request: GenerationRequest) -> Job:
        """Queues a request, or raises a 503 when the queue is full."""
        if self.running + self.waiting >= self.max_concurrency:
            raise APIError(
                503,
                f"The server is busy: {self.max_concurrency} requests are already running or "
                "queued (trit serves one at a time; see --max-concurrency). Retry later.",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        job = Job(request, asyncio.get_running_loop())
        self._waiting.append(job)
        self._next()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone or done: a waiting job leaves the queue now, a
        running one stops at its next token (and then frees the generator)."""
        job.cancelled.set()
        if job in self._waiting:
            self._waiting.remove(job)
            job.events.put_nowait(None)

    def _next(self) -> None:
        if self._running is not None or not self._waiting:
            return
        job = self._waiting.popleft()
        self._running = job
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, job)
        future.add_done_callback(lambda _: self._finished(job))

    def _finished(self, job: Job) -> None:
        self._running = None
        self._next()

    def shutdown(self) -> None:
        for job in [*self._waiting, *([self._running] if self._running else [])]:
            self.cancel(job)
        self._executor.shutdown(wait=False)

    def _run(self, job: Job) -> None:
        """In the worker thread: the whole generation of one job."""
        try:
            if not job.cancelled.is_set():
                self._generate(job)
        except _Cancelled:
            pass
        except InvalidInputError as exc:
            job.emit(Failed(_invalid(str(exc), None)))
        except Exception as exc:  # a bug: report it to the client, log the trace
            log.exception("generation failed")
            job.emit(Failed(APIError(500, f"generation failed: {exc}", type="server_error")))
        finally:
            job.emit(None)

    def _generate(self, job: Job) -> None:
        g = self.generator
        req = job.request
        pending: list[TokenLogprob] = []

        def on_token(token: int, logits: npt.NDArray[np.float32]) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            if req.logprobs is not None and token not in g.eos_ids:
                pending.append(_token_logprob(token, logits, req.logprobs))

        for piece in g.stream(req.ids, req.max_tokens, **req.sampling, on_token=on_token):
            job.emit(Piece(piece, pending[:]))
            pending.clear()
        stats = g.last_stats
        assert stats is not None  # the stream ran to its end
        job.emit(
            Done(
                _FINISH.get(stats.finish_reason, "stop"),
                stats.prompt_tokens,
                stats.new_tokens,
                pending[:],
            )
        )


# ---------------------------------------------------------------------------
# Responses


class EventStreamResponse(Response):
    """Server-sent events from a Job. Unlike Starlette's StreamingResponse it
    watches for the client's disconnect the whole time (while queued, during
    the prompt, between tokens) and cancels the job at once."""

    media_type = "text/event-stream"

    def __init__(
        self, scheduler: Scheduler, job: Job, events: Callable[[Job], AsyncIterator[bytes]]
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._scheduler = scheduler
        self._job = job
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda _: self._scheduler.cancel(self._job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._events(self._job):
                if self._job.cancelled.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            self._scheduler.cancel(self._job)
            watcher.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


@dataclass
class _Collected:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Done | None = None


async def _collect(job: Job) -> _Collected:
    out = _Collected()
    parts = []
    async for event in job.stream():
        if isinstance(event, Failed):
            raise event.error
        out.logprobs += event.logprobs
        if isinstance(event, Piece):
            parts.append(event.text)
        else:
            out.done = event
    out.text = "".join(parts)
    return out


# ---------------------------------------------------------------------------
# The app


def _authorized(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise APIError(
            401,
            "Incorrect or missing API key: send the server's key (trit serve --api-key) "
            "as `Authorization: Bearer KEY`.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _json_body(request: Request) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _invalid(f"the request body is not valid JSON: {exc}", None) from exc
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None)
    return body


def create_app(
    generator: Generator,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrency: int = 16,
) -> FastAPI:
    """The server's ASGI app around one loaded Generator. `model_name` is
    the id clients ask for (GET /v1/models lists it; another id gets a 404);
    with `api_key`, /v1/* need `Authorization: Bearer <api_key>`;
    `max_concurrency` bounds the requests running or waiting at once."""
    scheduler = Scheduler(generator, max_concurrency)
    created = int(time.time())
    fingerprint = f"trit-{__version__}"
    token_text = _TokenText(generator)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    app = FastAPI(title="trit", version=__version__, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback; the client gets OpenAI's shape.
        return APIError(500, f"internal error: {exc}", type="server_error").response()

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("`model` must be given: this server has " + repr(model_name), "model")
        if model != model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist: this server has `{model_name}`.",
                param="model",
                code="model_not_found",
            )

    async def run(
        request: Request,
        parse: Callable[[dict[str, Any], Generator], GenerationRequest],
        stream_events: Callable[[GenerationRequest, Job], AsyncIterator[bytes]],
        respond: Callable[[GenerationRequest, _Collected], dict[str, Any]],
    ) -> Any:
        _authorized(request, api_key)
        body = await _json_body(request)
        check_model(body)
        # Tokenizing a long prompt takes a while: not on the event loop.
        req = await asyncio.to_thread(parse, body, generator)
        job = scheduler.submit(req)
        if req.stream:
            return EventStreamResponse(scheduler, job, lambda j: stream_events(req, j))
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        watcher.add_done_callback(lambda _: scheduler.cancel(job))
        try:
            result = await _collect(job)
        finally:
            watcher.cancel()
            scheduler.cancel(job)
        if result.done is None:  # cancelled: the client is gone, nobody reads this
            raise APIError(499, "the client closed the request")
        return respond(req, result)

    # -- chat ---------------------------------------------------------------

    def chat_chunk(cid: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": fingerprint,
            "choices": [choice],
        }

    async def chat_events(req: GenerationRequest, job: Job) -> AsyncIterator[bytes]:
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield _sse(chat_chunk(cid, {**first, "finish_reason": None}))
        async for event in job.stream():
            if isinstance(event, Failed):
                yield _sse(event.error.body())
                return
            lp = (
                _chat_logprobs(event.logprobs, token_text)
                if req.logprobs is not None and event.logprobs
                else None
            )
            if isinstance(event, Piece):
                choice = {"index": 0, "delta": {"content": event.text}, "logprobs": lp}
                yield _sse(chat_chunk(cid, {**choice, "finish_reason": None}))
                continue
            choice = {"index": 0, "delta": {}, "logprobs": lp}
            yield _sse(chat_chunk(cid, {**choice, "finish_reason": event.finish_reason}))
            if req.include_usage:
                usage = {**chat_chunk(cid, {}), "choices": [], "usage": _usage(event)}
                yield _sse(usage)
            yield SSE_DONE

    def chat_response(req: GenerationRequest, r: _Collected) -> dict[str, Any]:
        assert r.done is not None
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text, "refusal": None},
                    "logprobs": (
                        _chat_logprobs(r.logprobs, token_text) if req.logprobs is not None else None
                    ),
                    "finish_reason": r.done.finish_reason,
                }
            ],
            "usage": _usage(r.done),
        }

    # -- completions --------------------------------------------------------

    def completion_chunk(cid: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": fingerprint,
            "choices": choices,
        }

    async def completion_events(req: GenerationRequest, job: Job) -> AsyncIterator[bytes]:
        cid = f"cmpl-{secrets.token_hex(12)}"
        offset = 0
        async for event in job.stream():
            if isinstance(event, Failed):
                yield _sse(event.error.body())
                return
            lp = None
            if req.logprobs is not None and event.logprobs:
                lp = _completion_logprobs(event.logprobs, token_text, offset)
                offset += sum(len(t) for t in lp["tokens"])
            if isinstance(event, Piece):
                choice = {"index": 0, "text": event.text, "logprobs": lp, "finish_reason": None}
                yield _sse(completion_chunk(cid, [choice]))
                continue
            last = {"index": 0, "text": "", "logprobs": lp, "finish_reason": event.finish_reason}
            yield _sse(completion_chunk(cid, [last]))
            if req.include_usage:
                yield _sse({**completion_chunk(cid, []), "usage": _usage(event)})
            yield SSE_DONE

    def completion_response(req: GenerationRequest, r: _Collected) -> dict[str, Any]:
        assert r.done is not None
        lp = None
        if req.logprobs is not None:
            lp = _completion_logprobs(r.logprobs, token_text, 0)
        choice = {"index": 0, "text": r.text, "logprobs": lp, "finish_reason": r.done.finish_reason}
        return {
            **completion_chunk(f"cmpl-{secrets.token_hex(12)}", [choice]),
            "usage": _usage(r.done),
        }

    # -- routes -------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, parse_chat, chat_events, chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, parse_completion, completion_events, completion_response)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "trit"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorized(request, api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        _authorized(request, api_key)
        check_model({"model": model})
        return model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "max_concurrency": scheduler.max_concurrency,
        }

    return app
