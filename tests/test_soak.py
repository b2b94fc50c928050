"""A soak test of `trit serve` (issue 15): 1,000 bounded requests mixing good,
bad and disconnecting clients against a real server process on a loopback
port, with the bundled model. Afterwards the server answers correctly, its
log holds no traceback, and its resources stay within these bounds, read
from /proc before (after a warm-up) and after:

- resident memory (VmRSS) grows by at most RSS_GROWTH_BOUND;
- open files (/proc/PID/fd) are at most FD_GROWTH_BOUND more;
- threads (/proc/PID/task) grow by at most what asyncio's default executor
  may still add (it starts threads up to min(32, cores + 4) as needed);
- every stalled connection is closed within the request timeout (+ slack).

Every good request is greedy and its text is compared with the same model
run in this process: a request never continues from another's cache."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from trit import Generator, models
from trit.server.app import max_body_bytes
from trit.server.protocol import PromptContext

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads the server's resources from /proc"
)

NAME = "fortunes"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
REQUEST_TIMEOUT = 2.0  # --request-timeout: stalled clients are dropped after it
CLIENTS = 8  # client threads
N_GOOD, N_BAD, N_GONE = 400, 400, 200
STALLED = 16  # connections that never finish their headers, held during the run
RSS_GROWTH_BOUND = 32 << 20
FD_GROWTH_BOUND = 4
TIMEOUT = 60.0
PROMPTS = ["Hi!", "Tell me a fortune.", "What is luck?", "Say something kind."]
MAX_TOKENS = 4


def proc_resources(pid: int) -> tuple[int, int, int]:
    """Resident bytes, open files and threads of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
    )
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return rss_kib << 10, fds, threads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def trit_serve(log: Path) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    port = free_port()
    cmd = [sys.executable, "-m", "trit.cli", "serve", "-t", "1", "--port", str(port)]
    cmd += ["--served-model-name", NAME, "--max-concurrency", "16", "--log-level", "info"]
    cmd += ["--request-timeout", str(REQUEST_TIMEOUT)]
    with open(log, "wb") as err:  # a file, not a pipe: the access log would fill a pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "trit serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Soak:
    """The requests, by class, and what each got."""

    def __init__(self, url: str, port: int, expected: dict[tuple[str, str], str]) -> None:
        self.url = url
        self.port = port
        self.expected = expected
        self.statuses: dict[str, Counter[int]] = {}
        self.wrong: list[str] = []
        self.left_mid_body = 0  # over the whole test, warm-up included
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        ctx = PromptContext.of(Generator.from_pretrained(models.path(), threads=1))
        self.too_long_prompt = "fortune " * (ctx.max_prompt_bytes // 8 + 1)
        self.body_limit = max_body_bytes(ctx)
        self.n_ctx = ctx.n_ctx

    def client(self) -> httpx.Client:
        if not hasattr(self._local, "client"):
            self._local.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)
            with self._lock:
                self._clients.append(self._local.client)
        client: httpx.Client = self._local.client
        return client

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def record(self, kind: str, status: int, wrong: str | None = None) -> None:
        with self._lock:
            self.statuses.setdefault(kind, Counter())[status] += 1
            if wrong:
                self.wrong.append(f"{kind}: {wrong}")

    # -- good: greedy, compared with the model run here ----------------------

    def good(self, rng: random.Random) -> None:
        prompt = rng.choice(PROMPTS)
        kind = rng.choice(["chat", "chat-stream", "completion", "completion-stream"])
        endpoint, stream = kind.split("-")[0], kind.endswith("stream")
        body: dict[str, Any] = {"model": NAME, "max_tokens": MAX_TOKENS, "temperature": 0}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        path = CHAT if endpoint == "chat" else COMP
        r = self.client().post(path, json={**body, "stream": stream})
        text = None
        if r.status_code == 200 and not stream:
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        elif r.status_code == 200:
            events = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
            chunks = [json.loads(e) for e in events if e != "[DONE]"]
            key = "delta" if endpoint == "chat" else None
            text = "".join(
                (c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
                for c in chunks
                if c.get("choices")
            )
        want = self.expected[endpoint, prompt]
        self.record(
            f"good {kind}", r.status_code, None if text == want else f"{text!r} != {want!r}"
        )

    # -- bad: every one a 4xx with OpenAI's body -----------------------------

    def bad(self, rng: random.Random) -> None:
        chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        nested = "[" * 50_000 + "]" * 50_000
        cases: list[tuple[str, bytes, int]] = [
            ("deep nesting", f'{{"model": "{NAME}", "messages": {nested}}}'.encode(), 400),
            ("top_k 2**70", json.dumps({**chat, "top_k": 2**70}).encode(), 400),
            (
                "float field 10**400",
                json.dumps(chat)[:-1].encode() + b', "top_p": 1' + b"0" * 400 + b"}",
                400,
            ),
            (
                "repetition_penalty 1e308",
                json.dumps({**chat, "repetition_penalty": 1e308}).encode(),
                400,
            ),
            (
                "lone surrogate",
                json.dumps({**chat, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
                400,
            ),
            ("lone surrogate model", json.dumps({**chat, "model": "\udc00"}).encode(), 400),
            (
                "prompt beyond the context",
                json.dumps(
                    {**chat, "messages": [{"role": "user", "content": self.too_long_prompt}]}
                ).encode(),
                400,
            ),
            (
                "max_tokens beyond the context",
                json.dumps({**chat, "max_tokens": self.n_ctx + 1}).encode(),
                400,
            ),
            ("body beyond the limit", b" " * (self.body_limit + 1), 413),
            ("invalid json", b'{"model": "fortunes", "messages": [', 400),
            ("n 2", json.dumps({**chat, "n": 2}).encode(), 400),
            ("unknown field", json.dumps({**chat, "tools": [{"type": "function"}]}).encode(), 400),
            ("wrong model", json.dumps({**chat, "model": "gpt-4o"}).encode(), 404),
        ]
        kind, raw, status = rng.choice(cases)
        r = self.client().post(CHAT, content=raw)
        wrong = None
        if r.status_code != status:
            wrong = f"{r.status_code}: {r.text[:200]}"
        elif set(r.json()["error"]) != {"message", "type", "param", "code"}:
            wrong = r.text[:200]
        self.record(f"bad {kind}", r.status_code, wrong)

    # -- clients that go away ------------------------------------------------

    def gone(self, rng: random.Random) -> None:
        kind = rng.choice(["mid-body", "mid-stream", "mid-headers", "before-response"])
        body = json.dumps(
            {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}
        ).encode()
        head = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            if kind == "mid-body":
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:20])
                time.sleep(0.01)
                with self._lock:
                    self.left_mid_body += 1
            elif kind == "mid-headers":
                sock.sendall(head.encode())
            elif kind == "before-response":
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            else:
                streamed = json.loads(body) | {"stream": True}
                raw = json.dumps(streamed).encode()
                sock.sendall(f"{head}Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
                first = sock.recv(4096)
                if not first.startswith(b"HTTP/1.1 200"):
                    self.record(f"gone {kind}", 0, repr(first[:100]))
                    return
        self.record(f"gone {kind}", 0)


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        h = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
        if h["running"] == 0 and h["waiting"] == 0:
            return
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def run_all(tasks: Sequence[Callable[[random.Random], None]], seed: int) -> None:
    def one(i: int) -> None:
        tasks[i](random.Random(seed * 100_003 + i))

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(len(tasks)), timeout=600))


def test_a_thousand_hostile_requests(tmp_path: Path) -> None:
    ref = Generator.from_pretrained(models.path(), threads=1)
    expected = {}
    for p in PROMPTS:
        expected["chat", p] = ref.chat([{"role": "user", "content": p}], MAX_TOKENS)
        expected["completion", p] = ref.generate(p, MAX_TOKENS)
    log = tmp_path / "serve.log"
    with trit_serve(log) as (url, port, proc):
        soak = Soak(url, port, expected)
        # Warm-up: every kind of request once or more, at the run's concurrency.
        run_all([soak.good] * 40 + [soak.bad] * 40 + [soak.gone] * 16, seed=1)
        soak.close()
        wait_idle(url)
        time.sleep(REQUEST_TIMEOUT + 1)  # stalled warm-up connections dropped
        before = proc_resources(proc.pid)
        soak.statuses.clear()

        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(STALLED)]
        for s in stalled:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
        t_stalled = time.monotonic()
        tasks = [soak.good] * N_GOOD + [soak.bad] * N_BAD + [soak.gone] * N_GONE
        random.Random(0).shuffle(tasks)
        run_all(tasks, seed=2)
        soak.close()
        for s in stalled:  # closed by the server once the request timeout passed
            s.settimeout(max(REQUEST_TIMEOUT + 10 - (time.monotonic() - t_stalled), 0.1))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()
        assert time.monotonic() - t_stalled < max(REQUEST_TIMEOUT + 10, 0)

        wait_idle(url)
        time.sleep(1.0)  # connections the clients closed are closed on the server too
        after = proc_resources(proc.pid)
        # The server still answers, and correctly.
        r = httpx.post(
            f"{url}{CHAT}",
            json={
                "model": NAME,
                "messages": [{"role": "user", "content": PROMPTS[1]}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
            timeout=TIMEOUT,
        )
        assert (
            r.status_code == 200
            and r.json()["choices"][0]["message"]["content"] == expected["chat", PROMPTS[1]]
        )
    server_log = log.read_text()
    counts = {k: dict(v) for k, v in sorted(soak.statuses.items())}
    summary = {
        "requests": sum(sum(c.values()) for c in soak.statuses.values()),
        "by class": counts,
        "stalled connections dropped": STALLED,
        "rss growth MiB": round((after[0] - before[0]) / 2**20, 2),
        "fd growth": after[1] - before[1],
        "thread growth": after[2] - before[2],
    }
    print(json.dumps(summary, indent=1))
    assert not soak.wrong, soak.wrong[:10]
    assert summary["requests"] == N_GOOD + N_BAD + N_GONE
    assert all(500 not in c for c in counts.values())
    assert all(set(c) == {200} for k, c in counts.items() if k.startswith("good"))
    assert "Traceback" not in server_log and "ERROR" not in server_log, server_log[-3000:]
    # each client that left mid-body is one line of the log
    assert server_log.count("went away before sending") == soak.left_mid_body
    assert after[0] - before[0] <= RSS_GROWTH_BOUND, summary
    assert after[1] - before[1] <= FD_GROWTH_BOUND, summary
    assert after[2] - before[2] <= min(32, (os.cpu_count() or 1) + 4), summary
