"""The HTTP app: routes, authentication, request bodies, server-sent event
streams, and the wiring of the protocol to the scheduler.

What one request may cost is bounded before it costs it: its body's size
(from the context size) and the time it takes to arrive; its JSON's depth; its
prompt's bytes (a prompt too long to fit is refused before it is tokenized);
and it is admitted to the queue (or gets a 503) before its prompt is
tokenized or its chat template rendered."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from trit._core import __version__
from trit.generator import Generator
from trit.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trit.server.metrics import Metrics
from trit.server.protocol import (
    APIError,
    GenerationRequest,
    ParsedRequest,
    PromptContext,
    Responses,
    TokenLogprob,
    TokenText,
    chat_logprobs,
    check_model,
    completion_logprobs,
    internal_error,
    parse_body,
    parse_chat,
    parse_completion,
    usage,
)
from trit.server.scheduler import BatchScheduler, Done, Failed, Job, Piece, Scheduler

AnyScheduler = Union[Scheduler, BatchScheduler]

log = logging.getLogger("trit.server")


def max_body_bytes(prompts: PromptContext) -> int:
    """Larger request bodies get a 413: room for the longest prompt that can
    fit the context, as JSON escapes may write it (up to 6 bytes per byte:
    \\u001f), for one message per token, and 64 KiB for the other fields."""
    return 6 * prompts.max_prompt_bytes + 64 * prompts.n_ctx + (64 << 10)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------
# Streams and collected results


class EventStreamResponse(Response):
    """Server-sent events from a Job. Unlike Starlette's StreamingResponse it
    watches for the client's disconnect the whole time (while queued, during
    the prompt, between tokens) and cancels the job at once."""

    media_type = "text/event-stream"

    def __init__(
        self, scheduler: AnyScheduler, job: Job, events: Callable[[Job], AsyncIterator[bytes]]
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
    return usage(done.prompt_tokens, done.completion_tokens)


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


# Errors about the body itself end the connection: what is left of the body
# would be read as the next request.
_CLOSE = {"connection": "close"}


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes (a 413), arrived within
    `timeout` seconds (a 408). A client that leaves mid-body gets one log line."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", headers=_CLOSE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {timeout:g} s", headers=_CLOSE
        ) from None
    except ClientDisconnect:
        client = request.client
        where = f"{client.host}:{client.port}" if client else "a client"
        log.info("%s went away before sending the whole request body", where)
        raise APIError(499, "the client closed the request") from None


def create_app(
    generator: Generator,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrency: int = 16,
    parallel: int = 1,
    request_timeout: float = 30.0,
) -> FastAPI:
    """The server's ASGI app around one loaded Generator. `model_name` is
    the id clients ask for (GET /v1/models lists it; another id gets a 404);
    with `api_key`, /v1/* need `Authorization: Bearer <api_key>`;
    `max_concurrency` bounds the requests running or waiting at once;
    `parallel` requests run together (continuous batching over the
    Generator's slots; 1: one at a time, in arrival order); a request body
    must arrive within `request_timeout` seconds."""
    scheduler: AnyScheduler
    metrics = Metrics(parallel, lambda: (scheduler.running, scheduler.waiting, scheduler.kv_bytes))
    if parallel == 1:
        scheduler = Scheduler(generator, max_concurrency, metrics)
    else:
        scheduler = BatchScheduler(generator, max_concurrency, parallel, metrics)
    created = int(time.time())
    prompts = PromptContext.of(generator)
    responses = Responses(model_name, f"trit-{__version__}", prompts.n_ctx)
    token_text = TokenText(generator.tokenizer.token_bytes)
    body_limit = max_body_bytes(prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    # No /docs, /redoc or /openapi.json: the API is OpenAI's, documented there,
    # and a schema served past --api-key would describe the server to anyone.
    app = FastAPI(
        title="trit",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises it after this answer, and uvicorn logs the
        # traceback; the client learns nothing of it.
        return error_response(internal_error())

    def completion_route(
        parse: Callable[[dict[str, Any], PromptContext], ParsedRequest],
        stream_events: Callable[[GenerationRequest, Job], AsyncIterator[bytes]],
        respond: Callable[[GenerationRequest, _Collected], dict[str, Any]],
    ) -> Callable[[Request], Any]:
        async def route(request: Request) -> Any:
            try:
                return await run(request, parse, stream_events, respond)
            except APIError:
                raise
            except Exception:  # a bug: the trace goes to the log, not to the client
                log.exception("%s %s failed", request.method, request.url.path)
                raise internal_error() from None

        return route

    def parse_request(
        raw: bytes, parse: Callable[[dict[str, Any], PromptContext], ParsedRequest]
    ) -> ParsedRequest:
        body = parse_body(raw)
        check_model(body, model_name)
        return parse(body, prompts)

    async def run(
        request: Request,
        parse: Callable[[dict[str, Any], PromptContext], ParsedRequest],
        stream_events: Callable[[GenerationRequest, Job], AsyncIterator[bytes]],
        respond: Callable[[GenerationRequest, _Collected], dict[str, Any]],
    ) -> Any:
        _authorized(request, api_key)
        raw = await _read_body(request, body_limit, request_timeout)
        # Parsing a large body, and tokenizing, take a while: not on the event loop.
        parsed = await asyncio.to_thread(parse_request, raw, parse)
        job = scheduler.admit()  # or a 503, before the heavy part
        try:
            req = await asyncio.to_thread(parsed.tokenize)
        except BaseException:
            scheduler.cancel(job)
            raise
        scheduler.ready(job, req)
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
        return responses.chat_chunk(cid, choice, int(time.time()))

    async def chat_events(req: GenerationRequest, job: Job) -> AsyncIterator[bytes]:
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield _sse(chat_chunk(cid, {**first, "finish_reason": None}))
        async for event in job.stream():
            if isinstance(event, Failed):
                yield _sse(event.error.body())
                return
            lp = (
                chat_logprobs(event.logprobs, token_text)
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
                yield _sse({**chat_chunk(cid, {}), "usage": _usage(event)})
            yield SSE_DONE

    def chat_response(req: GenerationRequest, r: _Collected) -> dict[str, Any]:
        assert r.done is not None
        return responses.chat_completion(
            f"chatcmpl-{secrets.token_hex(12)}",
            r.text,
            chat_logprobs(r.logprobs, token_text) if req.logprobs is not None else None,
            r.done.finish_reason,
            _usage(r.done),
            int(time.time()),
        )

    # -- completions --------------------------------------------------------

    def completion_chunk(cid: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return responses.completion_chunk(cid, choices, int(time.time()))

    async def completion_events(req: GenerationRequest, job: Job) -> AsyncIterator[bytes]:
        cid = f"cmpl-{secrets.token_hex(12)}"
        offset = 0
        async for event in job.stream():
            if isinstance(event, Failed):
                yield _sse(event.error.body())
                return
            lp = None
            if req.logprobs is not None and event.logprobs:
                lp = completion_logprobs(event.logprobs, token_text, offset)
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
            lp = completion_logprobs(r.logprobs, token_text, 0)
        choice = {"index": 0, "text": r.text, "logprobs": lp, "finish_reason": r.done.finish_reason}
        return {
            **completion_chunk(f"cmpl-{secrets.token_hex(12)}", [choice]),
            "usage": _usage(r.done),
        }

    # -- routes -------------------------------------------------------------

    app.add_api_route(
        "/v1/chat/completions",
        completion_route(parse_chat, chat_events, chat_response),
        methods=["POST"],
    )
    app.add_api_route(
        "/v1/completions",
        completion_route(parse_completion, completion_events, completion_response),
        methods=["POST"],
    )

    def model_card() -> dict[str, Any]:
        return responses.model_card(created)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorized(request, api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        _authorized(request, api_key)
        check_model({"model": model}, model_name)
        return model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "max_concurrency": scheduler.max_concurrency,
            "slots": scheduler.parallel,
            "slots_in_use": scheduler.running,
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    return app
