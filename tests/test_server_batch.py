"""`trit serve --parallel N`: continuous batching with concurrent clients
(the official openai client, loopback only, every wait bounded), freeing a
slot on disconnect, /health's slots and /metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import FIXTURES
from test_server import TIMEOUT, client, health, serving, wait_for

from trit import Generator, cli
from trit.server import create_app

MODEL_DIR = FIXTURES / "tiny-gqa-packed"
NAME = "tiny"
PARALLEL = 3
QUESTIONS = ["Hi!", "Who are you?", "Tell me a story.", "Why?", "What is love?", "OK."]


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.from_pretrained(MODEL_DIR, threads=2, slots=PARALLEL)


@pytest.fixture(scope="module")
def base(gen: Generator) -> Iterator[str]:
    app = create_app(gen, model_name=NAME, max_concurrency=8, parallel=PARALLEL)
    with serving(app) as url:
        yield url


def reference(question: str, n: int) -> str:
    g = Generator.from_pretrained(MODEL_DIR, threads=1)
    return g.chat([{"role": "user", "content": question}], n)


def ask(base: str, question: str, n: int) -> str:
    chunks = client(base).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=n,
        temperature=0,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def metric(text: str, name: str, absent: float | None = None) -> float:
    """The value of the sample `name` (with its labels, if any) in an
    exposition; `absent` if there is none (a label value not seen yet)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if m is None and absent is not None:
        return absent
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def test_concurrent_clients_each_get_their_own_answer(base: str, gen: Generator) -> None:
    h = health(base)
    assert h["slots"] == PARALLEL and h["slots_in_use"] == 0
    before = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text

    # While the test holds the engine, the first requests stop at their
    # first engine call and the others queue: they then join as slots free,
    # steps mixing prompts and decoded tokens.
    def arrived() -> bool:
        h = health(base)
        return bool(h["running"] + h["waiting"] == len(QUESTIONS))

    with gen._lock, ThreadPoolExecutor(len(QUESTIONS)) as pool:
        futures = [pool.submit(ask, base, q, 12) for q in QUESTIONS]
        wait_for(arrived, "the requests to arrive")
        assert 1 <= health(base)["running"] <= PARALLEL
        gen._lock.release()
        try:
            answers = [f.result(timeout=TIMEOUT) for f in futures]
        finally:
            gen._lock.acquire()
    assert answers == [reference(q, 12) for q in QUESTIONS]
    wait_for(lambda: health(base)["running"] == 0, "the slots to free")

    after = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    ended = sum(
        metric(after, f'trit_requests_total{{finish_reason="{r}"}}', 0) for r in ("length", "stop")
    )
    assert ended >= len(QUESTIONS)
    generated = metric(after, "trit_generated_tokens_total") - metric(
        before, "trit_generated_tokens_total"
    )
    assert 0 < generated <= 12 * len(QUESTIONS)
    # Some step ran several sequences at once.
    steps = metric(after, "trit_batch_size_count")
    assert metric(after, "trit_batch_size_sum") > steps
    assert metric(after, 'trit_batch_size_bucket{le="1.0"}') < steps
    assert metric(after, "trit_slots") == PARALLEL
    assert metric(after, "trit_requests_waiting") == 0
    assert metric(after, "trit_kv_cache_bytes_in_use") > 0
    assert metric(after, "trit_time_to_first_token_seconds_count") >= len(QUESTIONS)
    assert "trit_time_per_output_token_seconds_bucket" in after
    assert "trit_request_duration_seconds_bucket" in after


def test_a_client_that_leaves_frees_its_slot(base: str, gen: Generator) -> None:
    cancelled = 'trit_requests_total{finish_reason="cancelled"}'
    before = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    body: dict[str, Any] = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 200,
        "stream": True,
    }
    # The engine is held while the client comes and goes: the request has a
    # slot's worth of work waiting and must end before its first token.
    with gen._lock:
        with httpx.Client(timeout=TIMEOUT) as http:
            with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                wait_for(lambda: health(base)["running"] == 1, "the request to start")
        time.sleep(0.5)  # for the server to notice the disconnect
    wait_for(lambda: health(base)["running"] == 0, "the slot to free")
    after = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    assert metric(after, cancelled) == metric(before, cancelled, 0) + 1
    # The freed slot serves the next request.
    assert ask(base, "Hi!", 4) == reference("Hi!", 4)


def test_serve_refuses_a_parallel_that_cannot_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_available_memory", lambda: 1 << 20)
    code = cli.main(["serve", "-m", str(MODEL_DIR), "-t", "1", "--parallel", "64"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--parallel 64 needs up to" in err and "lower --parallel or --ctx" in err
