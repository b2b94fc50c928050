"""The queue in front of the one Generator: one generation at a time, in
arrival order, in one worker thread, each handing its events (text pieces,
log-probs, the end or an error) to the event loop.

A request takes its place in the queue (`admit`, or a 503) before any heavy
work is done for it: its prompt is tokenized while it holds that place
(`ready` then hands the Generator its ids), so the queue's bound also bounds
the tokenizing and template rendering going on at once."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

import numpy as np
import numpy.typing as npt

from trit._core import InvalidInputError
from trit.generator import Generator
from trit.server.protocol import (
    APIError,
    GenerationRequest,
    TokenLogprob,
    finish_reason,
    internal_error,
    invalid,
    token_logprob,
)

log = logging.getLogger("trit.server")


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
    worker thread and hands its events to the event loop. Its `request` is
    None while its prompt is being tokenized; the queue does not pass it by."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.request: GenerationRequest | None = None
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


class _TokenWatch:
    """The `on_token` of a job's generation: ends it at the first token after
    the client left, and collects log-probs when the request asked for them.
    Without log-probs it needs no logits (see `Generator`'s `wants_logits`)."""

    def __init__(self, job: Job, request: GenerationRequest, eos_ids: frozenset[int]) -> None:
        self._job = job
        self._eos_ids = eos_ids
        self._top = request.logprobs
        self.wants_logits = self._top is not None
        self.pending: list[TokenLogprob] = []

    def __call__(self, token: int, logits: npt.NDArray[np.float32]) -> None:
        if self._job.cancelled.is_set():
            raise _Cancelled
        if self._top is not None and token not in self._eos_ids:
            self.pending.append(token_logprob(token, logits, self._top))

    def take(self) -> list[TokenLogprob]:
        """The log-probs collected since the last call."""
        out, self.pending = self.pending, []
        return out


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

    def admit(self) -> Job:
        """A place at the end of the queue for a request whose prompt is yet
        to be tokenized, or a 503 when the queue is full. The caller then
        calls `ready` with the request, or `cancel`."""
        if self.running + self.waiting >= self.max_concurrency:
            raise APIError(
                503,
                f"The server is busy: {self.max_concurrency} requests are already running or "
                "queued (trit serves one at a time; see --max-concurrency). Retry later.",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        job = Job(asyncio.get_running_loop())
        self._waiting.append(job)
        return job

    def ready(self, job: Job, request: GenerationRequest) -> None:
        """The admitted `job` is tokenized: it runs when its turn comes."""
        job.request = request
        self._next()

    def submit(self, request: GenerationRequest) -> Job:
        """`admit` and `ready` at once, for a request already tokenized."""
        job = self.admit()
        self.ready(job, request)
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone or done: a waiting job leaves the queue now, a
        running one stops at its next token (and then frees the generator)."""
        job.cancelled.set()
        if job in self._waiting:
            self._waiting.remove(job)
            job.events.put_nowait(None)
            self._next()  # it may have been the head, still tokenizing

    def _next(self) -> None:
        if self._running is not None or not self._waiting or self._waiting[0].request is None:
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
            job.emit(Failed(invalid(str(exc), None)))
        except Exception:  # a bug: the trace goes to the log, not to the client
            log.exception("generation failed")
            job.emit(Failed(internal_error()))
        finally:
            job.emit(None)

    def _generate(self, job: Job) -> None:
        g = self.generator
        req = job.request
        assert req is not None  # only a ready job runs
        watch = _TokenWatch(job, req, g.eos_ids)
        for piece in g.stream(req.ids, req.max_tokens, sampling=req.sampling, on_token=watch):
            job.emit(Piece(piece, watch.take()))
        stats = g.last_stats
        assert stats is not None  # the stream ran to its end
        job.emit(
            Done(
                finish_reason(stats.finish_reason),
                stats.prompt_tokens,
                stats.new_tokens,
                watch.take(),
            )
        )
