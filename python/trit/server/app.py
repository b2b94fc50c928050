"""The HTTP app: routes, authentication, request bodies, server-sent event
streams, and the wiring of the protocol to the scheduler."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from trit._core import __version__
from trit.generator import Generator
from trit.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trit.server.metrics import Metrics
from trit.server.protocol import (
    APIError,
    GenerationRequest,
    PromptContext,
    Responses,
    TokenLogprob,
    TokenText,
    chat_logprobs,
    check_model,
    completion_logprobs,
    invalid,
    parse_chat,
    parse_completion,
    usage,
)
from trit.server.scheduler import BatchScheduler, Done, Failed, Job, Piece, Scheduler

AnyScheduler = Union[Scheduler, BatchScheduler]

MAX_BODY_BYTES = 16 << 20
"""Larger request bodies get a 413 (a full 128k-token prompt is about 0.5 MiB)."""


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
        raise invalid(f"the request body is not valid JSON: {exc}", None) from exc
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    return body


def create_app(
    generator: Generator,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrency: int = 16,
    parallel: int = 1,
) -> FastAPI:
    """The server's ASGI app around one loaded Generator. `model_name` is
    the id clients ask for (GET /v1/models lists it; another id gets a 404);
    with `api_key`, /v1/* need `Authorization: Bearer <api_key>`;
    `max_concurrency` bounds the requests running or waiting at once;
    `parallel` requests run together (continuous batching over the
    Generator's slots; 1: one at a time, in arrival order)."""
    scheduler: AnyScheduler
    metrics = Metrics(parallel, lambda: (scheduler.running, scheduler.waiting, scheduler.kv_bytes))
    if parallel == 1:
        scheduler = Scheduler(generator, max_concurrency, metrics)
    else:
        scheduler = BatchScheduler(generator, max_concurrency, parallel, metrics)
    created = int(time.time())
    responses = Responses(model_name, f"trit-{__version__}")
    prompts = PromptContext.of(generator)
    token_text = TokenText(generator.tokenizer.token_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    app = FastAPI(title="trit", version=__version__, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback; the client gets OpenAI's shape.
        return error_response(APIError(500, f"internal error: {exc}", type="server_error"))

    async def run(
        request: Request,
        parse: Callable[[dict[str, Any], PromptContext], GenerationRequest],
        stream_events: Callable[[GenerationRequest, Job], AsyncIterator[bytes]],
        respond: Callable[[GenerationRequest, _Collected], dict[str, Any]],
    ) -> Any:
        _authorized(request, api_key)
        body = await _json_body(request)
        check_model(body, model_name)
        # Tokenizing a long prompt takes a while: not on the event loop.
        req = await asyncio.to_thread(parse, body, prompts)
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, parse_chat, chat_events, chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, parse_completion, completion_events, completion_response)

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
