"""`trit batch`: generation over a JSON Lines file, one request a line,
resumable. Shared by the local run (one Generator, its slots batched) and the
Ray run (`trit.ray`, an actor pool of Generators).

Input: one JSON object a line (blank lines are skipped), with `prompt` (a
string or token ids) or `messages` (rendered with the chat template), an
optional `id` (a string or an integer, unique in the file; the line's number
when absent) and optional sampling fields, as the server takes them:
`max_tokens` (`max_completion_tokens` with messages), `temperature`,
`top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed` and `stop`. Fields a
line does not give take the job's (the command's flags, then the model's
generation_config.json).

Output: one JSON object a line, in the input's order: `{"id", "text",
"finish_reason", "usage"}`, or `{"id", "error": {"message", "param",
"code"}}` for a request the model could not take.

Errors come in two kinds, as in OpenAI's batch API. A line that is not a
request (not JSON, a missing prompt, an unknown field, a value out of range,
a repeated id) fails the whole job before anything runs, each bad line named
with its number and field: such a file is a mistake to fix, not work to
half-do. A request that is well-formed but that the model cannot take (a
prompt longer than its context, messages its chat template refuses) gets an
error row in its place and the job goes on.

Resuming: rows are written in order, each line in one write and flushed, and
synced to disk at least every `SYNC_SECONDS`. Run the same command again and
the rows already in the output are kept (a last line cut short by the
interruption is dropped) and the job goes on after them: nothing is lost and
nothing is written twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

from trit._core import InvalidInputError
from trit.generator import Batch, Generation, GenerationStats, Generator
from trit.sampling import SamplingOptions
from trit.server.protocol import (
    APIError,
    ParsedRequest,
    PromptContext,
    finish_reason,
    parse_chat,
    parse_completion,
    usage,
)

RowId = Union[str, int]

REQUEST_FIELDS = frozenset(
    {
        *("prompt", "messages", "max_tokens", "max_completion_tokens"),
        *("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"),
    }
)
"""The fields a line may hold besides `id`."""

MAX_REPORTED = 10
"""Bad lines listed in the error that fails a job (and how many more there are)."""

SYNC_SECONDS = 1.0
"""Most seconds between syncs of the output to disk."""

PROGRESS_SECONDS = 10.0
"""Seconds between progress lines of a job."""


@dataclass(frozen=True)
class Row:
    """One request of the input."""

    index: int
    """Its position among the input's requests, from 0."""
    line: int
    """Its line in the input file, from 1."""
    id: RowId
    body: dict[str, Any]
    """Its request fields (without `id`)."""

    def to_json(self) -> str:
        return json.dumps([self.index, self.line, self.id, self.body], ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Row:
        index, line, row_id, body = json.loads(text)
        return cls(index, line, row_id, body)


def _structure_context() -> PromptContext:
    """A context as large as any model's, for checking a line's fields
    without the model: what depends on the model (the context size, the
    vocabulary, the chat template) is checked where it runs."""

    def no_tokenizer(_: Any) -> list[int]:
        raise AssertionError("checking a line's fields does not tokenize")

    return PromptContext(1 << 40, 1 << 40, 1, no_tokenizer, no_tokenizer)


def parse_request(body: dict[str, Any], ctx: PromptContext) -> ParsedRequest:
    """The request of a line's fields (with the job's defaults under them),
    checked as the server checks a request: an APIError naming the field."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        name = unknown[0]
        hint = " (the model is the job's: -m)" if name == "model" else ""
        raise APIError(400, f"unknown field `{name[:80]}`{hint}", param=name[:80])
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt and has_messages:
        raise APIError(400, "give `prompt` or `messages`, not both", param="messages")
    if has_messages:
        return parse_chat(body, ctx)
    if not has_prompt:
        raise APIError(400, "a request needs `prompt` or `messages`", param="prompt")
    if body.get("max_completion_tokens") is not None:
        raise APIError(
            400,
            "`max_completion_tokens` goes with `messages`; a prompt takes `max_tokens`",
            param="max_completion_tokens",
        )
    return parse_completion(body, ctx)


def read_rows(path: Path) -> list[Row]:
    """The requests of a JSON Lines file, each line's fields checked; an
    InvalidInputError naming the file, line and field of every bad line
    (the first MAX_REPORTED of them)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    ctx = _structure_context()
    rows: list[Row] = []
    errors: list[str] = []
    seen: dict[RowId, int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = _row(raw, number, len(rows), ctx, seen)
        except ValueError as exc:
            errors.append(f"{path}:{number}: {exc}")
            continue
        seen[row.id] = number
        rows.append(row)
    if errors:
        more = len(errors) - MAX_REPORTED
        listed = errors[:MAX_REPORTED] + ([f"... and {more} more bad lines"] if more > 0 else [])
        raise InvalidInputError(
            f"{len(errors)} of the lines of {path} are not requests; nothing was run:\n"
            + "\n".join(listed)
        )
    return rows


def _row(raw: bytes, number: int, index: int, ctx: PromptContext, seen: dict[RowId, int]) -> Row:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("a line must be a JSON object")
    row_id = value.pop("id", None)
    if row_id is None:
        row_id = number
    elif isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ValueError(f"`id` must be a string or an integer, got {json.dumps(row_id)[:80]}")
    if row_id in seen:
        raise ValueError(f"`id` {json.dumps(row_id)[:80]} is also the id of line {seen[row_id]}")
    try:
        parse_request(value, ctx)
    except APIError as exc:
        raise ValueError(exc.message) from None
    return Row(index, number, row_id, value)


# ---------------------------------------------------------------------------
# Generation


def job_defaults(model: SamplingOptions, given: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The request fields a line does not give: `max_tokens`, the sampling
    flags `given` (SamplingOptions field -> value), then the model's
    generation defaults `model`."""
    return {
        "temperature": model.temperature,
        "top_k": model.top_k,
        "top_p": model.top_p,
        "min_p": model.min_p,
        "repetition_penalty": model.repetition_penalty,
        **given,
        "max_tokens": max_tokens,
    }


def error_row(row: Row, exc: APIError) -> dict[str, Any]:
    return {"id": row.id, "error": {"message": exc.message, "param": exc.param, "code": exc.code}}


def result_row(row: Row, text: str, stats: GenerationStats) -> dict[str, Any]:
    return {
        "id": row.id,
        "text": text,
        "finish_reason": finish_reason(stats.finish_reason),
        "usage": usage(stats.prompt_tokens, stats.new_tokens),
    }


def generate_rows(
    g: Generator, rows: Iterable[Row], defaults: dict[str, Any], slots: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Generates each row's reply, `slots` at once (default: as many as `g`
    has free; a row starts as soon as another ends); yields (row index,
    output row) as each ends, not in order. An engine failure raises (the
    rows yielded so far are done)."""
    ctx = PromptContext.of(g)
    waiting = iter(rows)
    batch = Batch(g)
    running: dict[int, tuple[Row, list[str]]] = {}
    try:
        while True:
            while g.free_slots and (slots is None or len(batch) < slots):
                row = next(waiting, None)
                if row is None:
                    break
                try:
                    req = parse_request({**defaults, **row.body}, ctx).tokenize()
                except APIError as exc:
                    yield row.index, error_row(row, exc)
                    continue
                seq = Generation(
                    row.index,
                    req.ids,
                    req.sampling.sampler(),
                    req.max_tokens,
                    list(req.sampling.stop),
                )
                batch.add(seq)
                running[row.index] = (row, [])
            if not len(batch):
                return
            for seq, piece, ended in batch.step():
                if seq.error is not None:
                    raise seq.error
                row, pieces = running[seq.index]
                pieces.append(piece)
                if ended:
                    del running[seq.index]
                    assert seq.stats is not None
                    yield row.index, result_row(row, "".join(pieces), seq.stats)
    finally:
        batch.close()


# ---------------------------------------------------------------------------
# The output file


def resume(path: Path, rows: list[Row]) -> int:
    """How many rows `path` already holds (0 when it does not exist), after
    dropping a last line that an interruption cut short; an
    InvalidInputError when it is not the output of these rows (a row whose
    id is not the input's at that place)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    lines = data[:complete].splitlines()
    if len(lines) > len(rows):
        raise InvalidInputError(
            f"{path} holds {len(lines)} rows and the input {len(rows)}: it is the output "
            "of another input (give another -o, or remove it)"
        )
    for number, (raw, row) in enumerate(zip(lines, rows), 1):
        try:
            written = json.loads(raw).get("id")
        except (ValueError, AttributeError):
            raise InvalidInputError(f"{path}:{number}: not an output row") from None
        if written != row.id:
            raise InvalidInputError(
                f"{path}:{number} is the row of id {json.dumps(written)[:80]}, and the input's "
                f"row {number} (line {row.line}) has id {json.dumps(row.id)[:80]}: {path} is "
                "the output of another input (give another -o, or remove it)"
            )
    return len(lines)


class OrderedWriter:
    """Appends output rows to a file in their input order, whatever order
    they end in: a row waits until those before it are written. Each line
    is one write, flushed at once (a killed process loses at most the line
    being written, which `resume` drops); the file is synced to disk every
    SYNC_SECONDS and when closed."""

    def __init__(self, path: Path, first: int) -> None:
        self._file: IO[bytes] = open(path, "ab")
        self._next = first
        self._ready: dict[int, dict[str, Any]] = {}
        self._synced = time.monotonic()
        self.written = 0
        self.errors = 0

    def add(self, index: int, row: dict[str, Any]) -> None:
        self._ready[index] = row
        while self._next in self._ready:
            out = self._ready.pop(self._next)
            self._file.write(json.dumps(out, ensure_ascii=False).encode() + b"\n")
            self._file.flush()
            self._next += 1
            self.written += 1
            self.errors += "error" in out
        if time.monotonic() - self._synced >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        self._file.flush()
        self.sync()
        self._file.close()


@dataclass
class JobResult:
    rows: int
    """Rows in the input."""
    skipped: int
    """Rows already in the output when the job started."""
    written: int
    errors: int
    """Of the rows written, those with an error."""


Runner = Callable[[list[Row]], Iterable[tuple[int, dict[str, Any]]]]
"""Generates rows: yields (row index, output row) for each, in any order."""


def run_job(
    rows: list[Row],
    output: Path,
    runner: Runner,
    progress: Callable[[str], None] | None = None,
) -> JobResult:
    """Writes the output of `rows` to `output`, after the rows it already holds."""
    done = resume(output, rows)
    todo = rows[done:]
    if progress is not None:
        progress(
            f"{len(rows)} rows, {done} already in {output}, {len(todo)} to generate"
            if done
            else f"{len(rows)} rows to generate"
        )
    writer = OrderedWriter(output, done)
    said = time.monotonic()
    try:
        if todo:
            for index, row in runner(todo):
                writer.add(index, row)
                if progress is not None and time.monotonic() - said >= PROGRESS_SECONDS:
                    progress(f"{done + writer.written} of {len(rows)} rows written")
                    said = time.monotonic()
    finally:
        writer.close()
    return JobResult(len(rows), done, writer.written, writer.errors)


def local_runner(g: Generator, defaults: dict[str, Any], slots: int | None = None) -> Runner:
    """Rows generated on `g`, `slots` at once (default: all of its slots)."""

    def run(rows: list[Row]) -> Iterator[tuple[int, dict[str, Any]]]:
        return generate_rows(g, rows, defaults, slots)

    return run
