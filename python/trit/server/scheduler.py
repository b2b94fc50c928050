"""The queue in front of the one Generator, in two forms: `Scheduler`, one
generation at a time in arrival order (`--parallel 1`), and
`BatchScheduler`, continuous batching over the Generator's slots (a request
joins the running batch at the next step and leaves it when done). Either
runs the engine in one worker thread and hands each request's events (text
pieces, log-probs, the end or an error) to the event loop.

A request takes its place in the queue (`admit`, or a 503) before any heavy
work is done for it: its prompt is tokenized while it holds that place
(`ready` then hands the Generator its ids), so the queue's bound also bounds
the tokenizing and template rendering going on at once."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

import numpy as np
import numpy.typing as npt

from trit._core import InvalidInputError
from trit.generator import Batch, Generation, Generator
from trit.server.metrics import Metrics
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
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
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
        if self._job.first_token is None:
            self._job.first_token = time.perf_counter()
        if self._top is not None and token not in self._eos_ids:
            self.pending.append(token_logprob(token, logits, self._top))

    def take(self) -> list[TokenLogprob]:
        """The log-probs collected since the last call."""
        out, self.pending = self.pending, []
        return out


class Scheduler:
    """A fair (FIFO) queue in front of one Generator. All its state lives on
    the event loop's thread; only `_run` runs in the worker thread."""

    parallel = 1

    def __init__(
        self, generator: Generator, max_concurrency: int, metrics: Metrics | None = None
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.generator = generator
        self.max_concurrency = max_concurrency
        self.metrics = metrics
        self.kv_bytes = 0
        """KV cache bytes in use, as of the last generation's end."""
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
        reason = "cancelled"
        try:
            if not job.cancelled.is_set():
                reason = self._generate(job)
        except _Cancelled:
            pass
        except InvalidInputError as exc:
            reason = "error"
            job.emit(Failed(invalid(str(exc), None)))
        except Exception:  # a bug: the trace goes to the log, not to the client
            reason = "error"
            log.exception("generation failed")
            job.emit(Failed(internal_error()))
        finally:
            job.emit(None)
            self.kv_bytes = self.generator.cache_bytes_in_use
            if self.metrics is not None:
                stats = self.generator.last_stats
                new = stats.new_tokens if stats is not None and reason != "cancelled" else 0
                prompt = len(job.request.ids) if job.request is not None else 0
                self.metrics.ended(reason, job.arrived, job.first_token, prompt, new)

    def _generate(self, job: Job) -> str:
        """Runs `job`; returns its finish reason."""
        g = self.generator
        req = job.request
        assert req is not None  # only a ready job runs
        watch = _TokenWatch(job, req, g.eos_ids)
        for piece in g.stream(req.ids, req.max_tokens, sampling=req.sampling, on_token=watch):
            job.emit(Piece(piece, watch.take()))
        stats = g.last_stats
        assert stats is not None  # the stream ran to its end
        reason = finish_reason(stats.finish_reason)
        job.emit(Done(reason, stats.prompt_tokens, stats.new_tokens, watch.take()))
        return reason


class BatchScheduler:
    """Continuous batching: up to `parallel` requests run together on the
    Generator's slots, one forward pass per step for all of them; a request
    joins at the next step after a slot frees and leaves as soon as it ends
    (or its client leaves). Beyond `parallel`, requests wait in arrival order,
    `max_concurrency` in all (running and waiting) before a 503. The queue is
    shared with the event loop under a lock; the batch lives in the worker."""

    def __init__(
        self,
        generator: Generator,
        max_concurrency: int,
        parallel: int,
        metrics: Metrics | None = None,
    ) -> None:
        if not 1 <= parallel <= generator.slots:
            raise ValueError(
                f"parallel must be between 1 and the generator's {generator.slots} slots, "
                f"got {parallel}"
            )
        if max_concurrency < parallel:
            raise ValueError(
                f"max_concurrency ({max_concurrency}) must be >= parallel ({parallel})"
            )
        self.generator = generator
        self.max_concurrency = max_concurrency
        self.parallel = parallel
        self.metrics = metrics
        self.kv_bytes = 0
        """KV cache bytes in use, as of the last step."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._stopped = False
        self._worker: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def admit(self) -> Job:
        """A place at the end of the queue for a request whose prompt is yet
        to be tokenized, or a 503 when the queue is full. The caller then
        calls `ready` with the request, or `cancel`."""
        job = Job(asyncio.get_running_loop())
        with self._lock:
            if self._running + len(self._waiting) >= self.max_concurrency:
                raise APIError(
                    503,
                    f"The server is busy: {self.max_concurrency} requests are already running "
                    f"or queued ({self.parallel} run at once; see --parallel and "
                    "--max-concurrency). Retry later.",
                    type="server_error",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
        return job

    def ready(self, job: Job, request: GenerationRequest) -> None:
        """The admitted `job` is tokenized: it joins the batch when a slot
        is free and the jobs before it have joined."""
        with self._lock:
            job.request = request
            self._wake.notify()
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._loop, name="trit-generate", daemon=True
                )
                self._worker.start()

    def submit(self, request: GenerationRequest) -> Job:
        """`admit` and `ready` at once, for a request already tokenized."""
        job = self.admit()
        self.ready(job, request)
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone or done: a waiting job leaves the queue now, a
        running one at the next step (which frees its slot)."""
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.events.put_nowait(None)
                self._wake.notify()  # it may have been the head, still tokenizing

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            waiting, self._waiting = list(self._waiting), deque()
            self._wake.notify()
        for job in waiting:
            job.cancelled.set()
            job.events.put_nowait(None)

    def _loop(self) -> None:
        """The worker thread: admit, step, hand out events, until shutdown."""
        batch = Batch(self.generator)
        jobs: dict[Generation, tuple[Job, _TokenWatch]] = {}
        try:
            while True:
                with self._lock:
                    while not self._stopped and not jobs and not self._head_ready():
                        self._wake.wait()
                    if self._stopped:
                        return
                    # In arrival order: a request still tokenizing holds back
                    # those behind it.
                    admitted: list[Job] = []
                    while self._head_ready() and len(jobs) + len(admitted) < self.parallel:
                        admitted.append(self._waiting.popleft())
                    self._running += len(admitted)
                for job in admitted:
                    self._admit(batch, jobs, job)
                events = batch.step()
                if self.metrics is not None and batch.last_step_sequences:
                    self.metrics.batch_size.observe(batch.last_step_sequences)
                for seq, piece, ended in events:
                    job, watch = jobs[seq]
                    if piece:
                        job.emit(Piece(piece, watch.take()))
                    if ended:
                        del jobs[seq]
                        self._end(job, seq, watch)
                self.kv_bytes = self.generator.cache_bytes_in_use
        except Exception:  # a bug: end every request rather than leave it hanging
            log.exception("the batch loop failed")
            for job, _ in jobs.values():
                job.emit(Failed(internal_error()))
        finally:
            batch.close()
            for job, _ in jobs.values():
                job.emit(None)

    def _head_ready(self) -> bool:
        """Whether the first waiting job is tokenized (the lock held)."""
        return bool(self._waiting) and self._waiting[0].request is not None

    def _admit(
        self, batch: Batch, jobs: dict[Generation, tuple[Job, _TokenWatch]], job: Job
    ) -> None:
        req = job.request
        assert req is not None  # only a ready job is admitted
        watch = _TokenWatch(job, req, self.generator.eos_ids)
        seq = Generation(
            0,
            req.ids,
            req.sampling.sampler(),
            req.max_tokens,
            list(req.sampling.stop),
            on_token=watch,
            cancelled=job.cancelled.is_set,
        )
        try:
            if job.cancelled.is_set():
                raise _Cancelled
            batch.add(seq)
        except (_Cancelled, InvalidInputError) as exc:
            if isinstance(exc, InvalidInputError):
                job.emit(Failed(invalid(str(exc), None)))
            job.emit(None)
            with self._lock:
                self._running -= 1
            if self.metrics is not None:
                reason = "error" if isinstance(exc, InvalidInputError) else "cancelled"
                self.metrics.ended(reason, job.arrived, None, len(req.ids), 0)
            return
        jobs[seq] = (job, watch)

    def _end(self, job: Job, seq: Generation, watch: _TokenWatch) -> None:
        stats = seq.stats
        assert stats is not None  # set when a sequence ends
        reason = stats.finish_reason
        if reason == "error" and not isinstance(seq.error, _Cancelled):
            if isinstance(seq.error, InvalidInputError):
                job.emit(Failed(invalid(str(seq.error), None)))
            else:  # a bug: the trace goes to the log, not to the client
                log.error("generation failed", exc_info=seq.error)
                job.emit(Failed(internal_error()))
        elif reason not in ("error", "cancelled"):
            reason = finish_reason(reason)
            done = Done(reason, stats.prompt_tokens, stats.new_tokens, watch.take())
            job.emit(done)
        else:
            reason = "cancelled"
        job.emit(None)
        with self._lock:
            self._running -= 1
        if self.metrics is not None:
            new = stats.new_tokens if reason != "cancelled" else 0
            self.metrics.ended(reason, job.arrived, job.first_token, stats.prompt_tokens, new)
