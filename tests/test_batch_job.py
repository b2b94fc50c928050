"""`trit batch` without Ray: a JSON Lines job on the local batched engine,
its output's order and ids, bad lines, error rows, and resuming after an
interruption (a truncated output, a killed process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trit import Generator, batch
from trit._core import InvalidInputError

QUESTIONS = ["Hi!", "Who are you?", "Tell me a story.", "Why?", "What is love?", "OK."]


def requests(n: int) -> list[dict[str, Any]]:
    """`n` requests: prompts and chats, some with ids, some with their own max_tokens."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
        else:
            out.append({"prompt": f"Fortune number {i}:"})
        if i % 2 == 0:
            out[-1]["id"] = f"req-{i}"
        if i % 5 == 0:
            out[-1]["max_tokens"] = 3
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def trit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def expected_ids(reqs: list[dict[str, Any]]) -> list[Any]:
    """Each request's id: its own, else its line number."""
    return [r.get("id", line) for line, r in enumerate(reqs, 1)]


def test_rows_come_out_in_order_with_their_ids_and_the_text_of_each_alone(tmp_path: Path) -> None:
    reqs = requests(24)
    source = write_jsonl(tmp_path / "in.jsonl", reqs)
    out = tmp_path / "out.jsonl"
    r = trit(
        "batch", str(source), "-o", str(out), "-n", "8", "--parallel", "4", "-t", "1", "--temp", "0"
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 24 rows" in r.stderr
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == expected_ids(reqs)
    # Greedy: each row's text is what the request gets alone, whatever ran beside it.
    g = Generator.from_pretrained(threads=1)
    for req, row in zip(reqs, rows):
        n = req.get("max_tokens", 8)
        alone = g.chat(req["messages"], n) if "messages" in req else g.generate(req["prompt"], n)
        assert row["text"] == alone
        assert row["usage"]["completion_tokens"] <= n
        assert row["finish_reason"] in ("stop", "length")
        assert row["usage"]["total_tokens"] == (
            row["usage"]["prompt_tokens"] + row["usage"]["completion_tokens"]
        )


def test_a_row_takes_its_own_sampling_fields(tmp_path: Path) -> None:
    seeded = {"prompt": "Once upon a time", "temperature": 0.9, "seed": 7, "max_tokens": 12}
    source = write_jsonl(tmp_path / "in.jsonl", [seeded, {**seeded, "id": "again"}])
    out = tmp_path / "out.jsonl"
    r = trit("batch", str(source), "-o", str(out), "-t", "1")
    assert r.returncode == 0, r.stderr
    first, second = read_jsonl(out)
    assert first["text"] == second["text"]  # the same seed, the same text
    # The fields the row does not give are the model's generation_config.json's.
    g = Generator.from_pretrained(threads=1)
    model = g.generation_defaults
    assert model.temperature != 0.9 and model.top_k == 40
    alone = g.generate("Once upon a time", 12, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    assert first["text"] == alone


def test_bad_lines_fail_the_job_before_it_runs_naming_line_and_field(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "fine"}',
        '{"prompt": "hot", "temperature": 5}',
        "not json",
        "",  # blank lines are skipped
        '{"id": "x", "prompt": "a"}',
        '{"id": "x", "prompt": "b"}',
        '{"messages": "hello"}',
        '{"prompt": "p", "model": "gpt-4o"}',
        '{"prompt": "p", "messages": [{"role": "user", "content": "m"}]}',
        '{"id": 1.5, "prompt": "p"}',
        '{"max_tokens": 3}',
        '{"prompt": "p", "max_completion_tokens": 3}',
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = trit("batch", str(source), "-o", str(out))
    assert r.returncode == 1
    assert "9 of the lines" in r.stderr and "nothing was run" in r.stderr
    for expected in (
        ":2: `temperature` must be in [0, 2], got 5",
        ":3: not valid JSON",
        ':6: `id` "x" is also the id of line 5',
        ":7: `messages` must be a non-empty list",
        ":8: unknown field `model`",
        ":9: give `prompt` or `messages`, not both",
        ":10: `id` must be a string or an integer",
        ":11: a request needs `prompt` or `messages`",
        ":12: `max_completion_tokens` goes with `messages`",
    ):
        assert expected in r.stderr, (expected, r.stderr)
    assert not out.exists()


def test_many_bad_lines_are_listed_up_to_a_bound(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "top_k": -1}] * 25)
    with pytest.raises(InvalidInputError, match="25 of the lines") as err:
        batch.read_rows(source)
    assert str(err.value).count("`top_k` must be") == batch.MAX_REPORTED
    assert "... and 15 more bad lines" in str(err.value)


def test_a_request_the_model_cannot_take_gets_an_error_row(tmp_path: Path) -> None:
    too_long = {"id": "long", "prompt": "fortune " * 2000}
    no_room = {"id": "max", "prompt": "Hi", "max_tokens": 100_000}
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}, too_long, no_room])
    out = tmp_path / "out.jsonl"
    r = trit("batch", str(source), "-o", str(out), "-n", "4", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "2 with an error" in r.stderr
    ok, long, max_tokens = read_jsonl(out)
    assert ok["id"] == 1 and "text" in ok
    assert long == {
        "id": "long",
        "error": {
            "message": long["error"]["message"],
            "param": "prompt",
            "code": "context_length_exceeded",
        },
    }
    assert "maximum context length is 256 tokens" in long["error"]["message"]
    assert max_tokens["error"]["param"] == "max_tokens"


def test_a_truncated_output_resumes_after_its_last_complete_row(tmp_path: Path) -> None:
    reqs = requests(30)
    source = write_jsonl(tmp_path / "in.jsonl", reqs)
    reference = tmp_path / "reference.jsonl"
    args = ["batch", str(source), "-n", "6", "-t", "1", "--temp", "0"]
    assert trit(*args, "-o", str(reference)).returncode == 0
    full = reference.read_bytes()
    # Cut inside row 13: rows 1-12 are kept, the cut one is generated again.
    lines = full.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:12]) + lines[12][:10])
    r = trit(*args, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "30 rows, 12 already in" in r.stderr and "wrote 18 rows" in r.stderr
    assert out.read_bytes() == full
    # Run again: nothing left to do, nothing written twice.
    r = trit(*args, "-o", str(out))
    assert r.returncode == 0 and "wrote 0 rows" in r.stderr
    assert out.read_bytes() == full


# The bundled model answers faster than a signal can be aimed at the job:
# each row is delayed; the SIGKILL is real.
SLOW_BATCH = """
import sys, time
import trit.batch
from trit.cli import main

original = trit.batch.generate_rows

def slow_rows(*args, **kwargs):
    for item in original(*args, **kwargs):
        time.sleep(0.03)
        yield item

trit.batch.generate_rows = slow_rows
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_job_run_again_loses_and_repeats_nothing(tmp_path: Path) -> None:
    reqs = requests(120)
    source = write_jsonl(tmp_path / "in.jsonl", reqs)
    args = ["batch", str(source), "-n", "6", "-t", "1", "--parallel", "3", "--temp", "0"]
    reference = tmp_path / "reference.jsonl"
    assert trit(*args, "-o", str(reference)).returncode == 0
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_BATCH, *args, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not out.exists() or out.read_bytes().count(b"\n") < 20:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the job wrote no rows"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    written = out.read_bytes().count(b"\n")
    assert 20 <= written < len(reqs)
    r = trit(*args, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{written} already in" in r.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert [row["id"] for row in read_jsonl(out)] == expected_ids(reqs)


def test_the_output_of_another_input_is_refused(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", requests(6))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "someone-else", "text": "x"}) + "\n")
    r = trit("batch", str(source), "-o", str(out))
    assert r.returncode == 1
    assert 'is the row of id "someone-else"' in r.stderr and "another input" in r.stderr
    assert out.read_text().count("\n") == 1  # left as it was


def test_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    out = str(tmp_path / "out.jsonl")
    cases = [
        (["--workers", "2"], "--workers needs --ray"),
        (["--ray-address", "auto"], "--ray-address needs --ray"),
        (["-n", "0"], "-n must be at least 1"),
        (["--parallel", "0"], "--parallel must be in [1, "),
        (["--temp", "-1"], "argument --temp"),
    ]
    for flags, message in cases:
        r = trit("batch", str(source), "-o", out, *flags)
        assert r.returncode == 2, (flags, r.stderr)
        assert message in r.stderr, (flags, r.stderr)
    r = trit("batch", str(source), "-o", str(source))
    assert r.returncode == 2 and "must not be the input" in r.stderr
    r = trit("batch", str(tmp_path / "missing.jsonl"), "-o", out)
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_job_defaults_take_the_flags_over_the_model() -> None:
    from trit.sampling import SamplingOptions

    model = SamplingOptions(temperature=0.6, top_k=40, top_p=0.9)
    fields = batch.job_defaults(model, {"temperature": 0.2, "seed": 3}, 32)
    assert fields == {
        "temperature": 0.2,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "seed": 3,
        "max_tokens": 32,
    }
