"""`trit serve`: the OpenAI-compatible server, run for real (uvicorn in a
thread, or `trit serve` in a subprocess) on a loopback port with a fixture
model, called with the official openai client and with raw HTTP.

Every wait is bounded; a generation that has to last is slowed down by
`Throttled`, which sleeps between tokens (outside the GIL, as the engine's
compute is)."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
import uvicorn
from conftest import FIXTURES, generator
from fastapi import FastAPI

from trit import Generator, models
from trit.generator import Prompt, TokenCallback
from trit.server import create_app

MODEL_DIR = FIXTURES / "tiny-gqa-packed"
NAME = "tiny"
HI: Any = [{"role": "user", "content": "Hi!"}]  # the openai client wants TypedDicts
TIMEOUT = 30.0  # seconds, for every client call


class Throttled(Generator):
    """A Generator that sleeps `delay` seconds after each token, holds its
    first token until `gate` is open, counts tokens and records the
    max_new_tokens of each generation it starts."""

    delay = 0.0
    tokens = 0
    gate: threading.Event | None = None
    started: list[int]

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        on_token: TokenCallback | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        if not hasattr(self, "started"):
            self.started = []
        self.started.append(max_new_tokens)

        def hook(token: int, logits: npt.NDArray[np.float32]) -> None:
            if self.gate is not None:
                assert self.gate.wait(TIMEOUT), "the gate was never opened"
            self.tokens += 1
            if self.delay:
                time.sleep(self.delay)
            if on_token is not None:
                on_token(token, logits)

        return super().stream(prompt, max_new_tokens, on_token=hook, **kwargs)


def load() -> Throttled:
    g = Throttled.from_pretrained(MODEL_DIR, threads=1)
    assert isinstance(g, Throttled)
    return g


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Runs `app` with uvicorn in a thread on a free loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def client(base: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)


def health(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/health", timeout=TIMEOUT)
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def wait_for(cond: Any, what: str, limit: float = 10.0) -> float:
    """Polls `cond()` until it is true; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def gen() -> Throttled:
    return load()


@pytest.fixture(scope="module")
def base(gen: Throttled) -> Iterator[str]:
    with serving(create_app(gen, model_name=NAME, max_concurrency=8)) as url:
        yield url


@pytest.fixture(autouse=True)
def no_throttle(gen: Throttled) -> Iterator[None]:
    gen.delay = 0.0
    yield
    gen.delay = 0.0


def reference() -> Generator:
    """A second Generator on the same model, to compute expected outputs."""
    return generator("tiny-gqa-packed", exact=False)


# -- the openai client ------------------------------------------------------


def test_models_and_health(base: str) -> None:
    c = client(base)
    assert [m.id for m in c.models.list()] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    h = health(base)
    assert h["status"] == "ok" and h["model"] == NAME
    assert h["running"] == 0 and h["waiting"] == 0 and h["max_concurrency"] == 8


def test_chat_equals_the_generator(base: str) -> None:
    ref = reference()
    want = ref.chat(HI, 12)
    stats = ref.last_stats
    assert stats is not None
    r = client(base).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi!"}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want
    assert choice.finish_reason == {"length": "length", "eos": "stop"}[stats.finish_reason]
    assert choice.logprobs is None
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_chat(HI)) == stats.prompt_tokens
    assert r.usage.completion_tokens == stats.new_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(base: str) -> None:
    c = client(base)
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "more."}],
        },
    ]
    full = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert len({ch.id for ch in chunks}) == 1
    finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finished[-1] == full.choices[0].finish_reason and not any(finished[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_developer_role_is_a_system_message(base: str) -> None:
    c = client(base)
    kwargs: Any = {"model": NAME, "max_tokens": 8, "temperature": 0}
    a = c.chat.completions.create(
        messages=[{"role": "developer", "content": "Be kind."}, *HI], **kwargs
    )
    b = c.chat.completions.create(
        messages=[{"role": "system", "content": "Be kind."}, *HI], **kwargs
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_multi_turn_with_the_returned_message(base: str) -> None:
    c = client(base)
    first = c.chat.completions.create(model=NAME, messages=HI, max_tokens=6, temperature=0)
    turn: Any = [*HI, first.choices[0].message, {"role": "user", "content": "And then?"}]
    r = c.chat.completions.create(model=NAME, messages=turn, max_tokens=6, temperature=0)
    ref = reference()
    history = [*HI, {"role": "assistant", "content": first.choices[0].message.content}]
    history.append({"role": "user", "content": "And then?"})
    assert r.choices[0].message.content == ref.chat(history, 6)


def test_completions_text_and_token_prompts(base: str) -> None:
    ref = reference()
    c = client(base)
    want = ref.generate("Once upon a time", 10)
    r = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage is not None and r.usage.prompt_tokens == len(ref.encode("Once upon a time"))
    ids = ref.encode("Once upon a time")
    r2 = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert r2.choices[0].text == want
    chunks = list(
        c.completions.create(model=NAME, prompt=[ids], max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_completions_default_to_16_tokens(base: str) -> None:
    r = client(base).completions.create(model=NAME, prompt=[509], temperature=0)
    assert r.usage is not None and r.usage.completion_tokens <= 16
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")


def test_sampling_is_seeded_like_the_generator(base: str) -> None:
    ref = reference()
    want = ref.generate("Hello world", 16, temperature=0.9, top_p=0.9, seed=7)
    c = client(base)
    kwargs: Any = {"model": NAME, "prompt": "Hello world", "max_tokens": 16}
    got = [
        c.completions.create(temperature=0.9, top_p=0.9, seed=7, **kwargs).choices[0].text
        for _ in range(2)
    ]
    assert got == [want, want]
    other = c.completions.create(temperature=0.9, top_p=0.9, seed=8, **kwargs).choices[0].text
    assert other != want  # 16 tokens from a 512-token vocabulary
    # trit's own sampling options ride in the body next to OpenAI's.
    extra: Any = {"top_k": 3, "min_p": 0.05, "repetition_penalty": 1.3}
    want = ref.generate("Hello world", 16, temperature=0.9, seed=7, **extra)
    got1 = c.completions.create(temperature=0.9, seed=7, extra_body=extra, **kwargs)
    assert got1.choices[0].text == want


def test_max_tokens_and_stop(base: str) -> None:
    ref = reference()
    c = client(base)
    r = c.chat.completions.create(model=NAME, messages=HI, max_completion_tokens=3, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"
    # max_completion_tokens wins over max_tokens
    r = c.chat.completions.create(
        model=NAME,
        messages=HI,
        max_completion_tokens=2,
        max_tokens=9,
        temperature=0,
    )
    assert r.usage is not None and r.usage.completion_tokens == 2
    full = ref.chat(HI, 30)
    stop = full[8:11]
    want = ref.chat(HI, 30, stop=[stop, "never"])
    assert len(want) < len(full)
    for stream in (False, True):
        kwargs: Any = {"model": NAME, "messages": HI, "max_tokens": 30, "temperature": 0}
        if stream:
            chunks = list(c.chat.completions.create(stream=True, stop=[stop, "never"], **kwargs))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.chat.completions.create(stop=stop, **kwargs)
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        assert text == want and finish == "stop"


def collect_logprobs(
    g: Generator, prompt: Prompt, n: int
) -> tuple[list[int], list[npt.NDArray[np.float64]]]:
    """The tokens a greedy run samples and log-softmax of their logits."""
    tokens, logprobs = [], []

    def hook(token: int, logits: npt.NDArray[np.float32]) -> None:
        x = logits.astype(np.float64)
        tokens.append(token)
        logprobs.append(x - x.max() - math.log(np.exp(x - x.max()).sum()))

    g.generate(prompt, n, on_token=hook)
    return tokens, logprobs


def test_chat_logprobs(base: str) -> None:
    ref = reference()
    tokens, logprobs = collect_logprobs(ref, ref.tokenizer.encode_chat(HI), 10)
    tokens = [t for t in tokens if t not in ref.eos_ids]
    for stream in (False, True):
        kwargs: Any = {"model": NAME, "messages": HI, "max_tokens": 10, "temperature": 0}
        kwargs |= {"logprobs": True, "top_logprobs": 3}
        c = client(base)
        if stream:
            entries = [
                e
                for ch in c.chat.completions.create(stream=True, **kwargs)
                if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content
                for e in ch.choices[0].logprobs.content
            ]
        else:
            r = c.chat.completions.create(**kwargs)
            assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
            entries = r.choices[0].logprobs.content
        assert len(entries) == len(tokens)
        for e, token, lp in zip(entries, tokens, logprobs):
            assert bytes(e.bytes or []) == ref.tokenizer.token_bytes(token)
            assert e.logprob == pytest.approx(lp[token], abs=1e-6)
            assert len(e.top_logprobs) == 3
            assert e.top_logprobs[0].token == e.token  # greedy takes the best
            best = np.sort(lp)[::-1][:3]
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(best.tolist(), abs=1e-6)


def test_completion_logprobs(base: str) -> None:
    ref = reference()
    tokens, logprobs = collect_logprobs(ref, [509], 6)
    r = client(base).completions.create(
        model=NAME, prompt=[509], max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    n = len(lp.token_logprobs)
    assert [t for t in tokens if t not in ref.eos_ids] and n == len(
        [t for t in tokens if t not in ref.eos_ids]
    )
    for i in range(n):
        assert lp.token_logprobs[i] == pytest.approx(logprobs[i][tokens[i]], abs=1e-6)
        assert len(lp.top_logprobs[i]) <= 2
    assert lp.text_offset is not None and lp.text_offset[0] == 0


# -- errors, as raw HTTP ----------------------------------------------------

LONG = "the quick brown fox jumps over the lazy dog " * 60  # ~600 tokens > n_ctx 256

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": NAME, "messages": HI, **fields}


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": NAME, "prompt": "Hello", **fields}


ERRORS: list[tuple[str, Any, int, str | None, str | None]] = [
    # path, body, status, param, code
    (CHAT, {"messages": HI}, 400, "model", None),
    (CHAT, {"model": NAME}, 400, "messages", None),
    (CHAT, chat(messages=[]), 400, "messages", None),
    (CHAT, chat(messages="Hi"), 400, "messages", None),
    (CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages", None),
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages", None),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages",
        None,
    ),
    (
        CHAT,
        chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]),
        400,
        "messages",
        None,
    ),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": LONG}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (COMP, comp(prompt=LONG), 400, "prompt", "context_length_exceeded"),
    (CHAT, {"model": "gpt-4o", "messages": HI}, 404, "model", "model_not_found"),
    (COMP, comp(model="nope"), 404, "model", "model_not_found"),
    (CHAT, chat(temperature=-0.5), 400, "temperature", None),
    (CHAT, chat(temperature=2.5), 400, "temperature", None),
    (CHAT, chat(temperature="hot"), 400, "temperature", None),
    (CHAT, chat(top_p=0), 400, "top_p", None),
    (CHAT, chat(top_p=1.5), 400, "top_p", None),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    (CHAT, chat(max_completion_tokens=-1), 400, "max_completion_tokens", None),
    (CHAT, chat(seed=1.5), 400, "seed", None),
    (CHAT, chat(stop=[1]), 400, "stop", None),
    (CHAT, chat(stop=""), 400, "stop", None),
    (CHAT, chat(n=2), 400, "n", None),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice", None),
    (CHAT, chat(functions=[]), 400, "functions", None),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", None),
    (CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias", None),
    (CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", None),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    (CHAT, chat(frobnicate=1), 400, "frobnicate", None),
    (COMP, comp(prompt=["a", "b"]), 400, "prompt", None),
    (COMP, comp(prompt=[1, 100000]), 400, "prompt", None),
    (COMP, comp(prompt=[]), 400, "prompt", None),
    (COMP, comp(echo=True), 400, "echo", None),
    (COMP, comp(suffix="x"), 400, "suffix", None),
    (COMP, comp(best_of=2), 400, "best_of", None),
    (COMP, comp(logprobs=6), 400, "logprobs", None),
    (COMP, comp(n=3), 400, "n", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), ERRORS)
def test_bad_requests_get_openai_errors(
    base: str, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    r = httpx.post(f"{base}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param and err["code"] == code


def test_unparseable_bodies_and_unknown_routes(base: str) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(f"{base}{CHAT}", content=raw, timeout=TIMEOUT)
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{base}/v1/nothing", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{base}{CHAT}", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{base}/v1/models/gpt-4", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_errors_come_back_through_the_openai_client(base: str) -> None:
    c = client(base)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=NAME, messages=HI, n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=HI)
    # the server is still fine
    r = c.chat.completions.create(model=NAME, messages=HI, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_api_key() -> None:
    with serving(create_app(load(), model_name=NAME, api_key="sekrit")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.post(f"{url}{CHAT}", json=chat(), headers=headers, timeout=TIMEOUT)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        ok = client(url, api_key="sekrit").chat.completions.create(
            model=NAME, messages=HI, max_tokens=2
        )
        assert ok.usage is not None and ok.usage.completion_tokens >= 1
        assert health(url)["status"] == "ok"  # /health stays open


# -- concurrency ------------------------------------------------------------

PROMPTS = [
    "Hi!",
    "What is a license?",
    "Tell me a story.",
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Now is better than never.",
    "Errors should never pass silently.",
]


def stream_chat(base: str, text: str, max_tokens: int = 24) -> tuple[str, str | None]:
    chunks = client(base).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    parts, finish = [], None
    for ch in chunks:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_concurrent_clients_are_each_served_as_if_alone(base: str, gen: Throttled) -> None:
    alone = [stream_chat(base, p) for p in PROMPTS]
    assert len(set(alone)) > 1
    gen.delay = 0.002
    start = threading.Barrier(len(PROMPTS), timeout=TIMEOUT)

    def one(p: str) -> tuple[str, str | None]:
        start.wait()
        return stream_chat(base, p)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(one, PROMPTS, timeout=120))
    assert together == alone
    assert all(finish in ("stop", "length") for _, finish in together)
    assert health(base)["running"] == 0 and health(base)["waiting"] == 0


def open_stream(http: httpx.Client, base: str, body: dict[str, Any]) -> httpx.Response:
    request = http.build_request("POST", f"{base}{CHAT}", json={**body, "stream": True})
    r = http.send(request, stream=True)
    assert r.status_code == 200
    return r


def admitted(url: str) -> int:
    h = health(url)
    return int(h["running"] + h["waiting"])


def test_queue_is_fifo_and_bounded() -> None:
    g = load()
    g.gate = threading.Event()  # the first request holds the generator until the gate opens
    with serving(create_app(g, model_name=NAME, max_concurrency=3)) as url:

        def run(max_tokens: int) -> int:
            body = chat(max_tokens=max_tokens, temperature=0)
            r = httpx.post(f"{url}{CHAT}", json=body, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            n: int = r.json()["usage"]["completion_tokens"]
            return n

        lengths = [5, 6, 7]  # tell the requests apart in g.started
        with ThreadPoolExecutor(3) as pool:
            futures = []
            for i, n in enumerate(lengths):
                futures.append(pool.submit(run, n))
                # the next one arrives once this one is running or queued (the
                # gate is closed: none finishes)
                wait_for(lambda i=i: admitted(url) == i + 1, "admission")
            assert health(url)["running"] == 1
            full = httpx.post(f"{url}{CHAT}", json=chat(max_tokens=1), timeout=TIMEOUT)
            assert full.status_code == 503
            assert full.headers["retry-after"] == "1"
            err = full.json()["error"]
            assert err["code"] == "server_busy" and err["type"] == "server_error"
            g.gate.set()
            assert [f.result(timeout=TIMEOUT) for f in futures] == lengths
        assert g.started == lengths  # served in arrival order
        h = health(url)
        assert h["running"] == 0 and h["waiting"] == 0


def test_disconnect_mid_stream_frees_the_slot() -> None:
    g = load()
    g.delay = 0.05  # 200 tokens: 10 s
    with serving(create_app(g, model_name=NAME, max_concurrency=1)) as url:
        body = chat(max_tokens=200, temperature=0)
        with httpx.Client(timeout=TIMEOUT) as http:
            r = open_stream(http, url, body)
            lines = r.iter_lines()
            data: list[Any] = []
            for line in lines:
                if line.startswith("data: "):
                    data.append(json.loads(line[6:]))
                    if len(data) == 4:
                        break
            r.close()
        t_closed = time.monotonic()
        wait_for(lambda: health(url)["running"] == 0, "the generation to stop", limit=5)
        assert g.tokens < 100  # stopped long before 200
        stopped_at = g.tokens
        # the only slot is free: the next request is served at once
        g.delay = 0.0
        r2 = httpx.post(f"{url}{CHAT}", json=chat(max_tokens=5, temperature=0), timeout=TIMEOUT)
        assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 5
        assert time.monotonic() - t_closed < 6  # the rest of the generation: ~10 s
        assert g.tokens == stopped_at + 5


def test_disconnect_while_queued_leaves_the_queue() -> None:
    g = load()
    g.delay = 0.02
    with serving(create_app(g, model_name=NAME, max_concurrency=2)) as url:
        with httpx.Client(timeout=TIMEOUT) as first, httpx.Client(timeout=TIMEOUT) as second:
            a = open_stream(first, url, chat(max_tokens=100, temperature=0))
            wait_for(lambda: health(url)["running"] == 1, "the first request to run")
            b = open_stream(second, url, chat(max_tokens=100, temperature=0))
            wait_for(lambda: health(url)["waiting"] == 1, "the second request to queue")
            b.close()
            wait_for(lambda: health(url)["waiting"] == 0, "the queue to empty", limit=5)
            assert health(url)["running"] == 1  # the first goes on
            a.close()
        wait_for(lambda: health(url)["running"] == 0, "the generation to stop", limit=5)


def test_non_stream_client_timeout_stops_the_generation() -> None:
    g = load()
    g.delay = 0.05  # 200 tokens: 10 s
    with serving(create_app(g, model_name=NAME)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{CHAT}", json=chat(max_tokens=200), timeout=0.5)
        wait_for(lambda: health(url)["running"] == 0, "the generation to stop", limit=5)
        assert g.tokens < 100


def test_health_answers_during_a_long_generation(base: str, gen: Throttled) -> None:
    gen.delay = 0.05  # 150 tokens: 7.5 s
    with httpx.Client(timeout=TIMEOUT) as http:
        r = open_stream(http, base, chat(max_tokens=150, temperature=0))
        wait_for(lambda: health(base)["running"] == 1, "the generation to start")
        slowest = 0.0
        for _ in range(5):
            t0 = time.monotonic()
            assert health(base)["running"] == 1  # answered while the generation runs
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.05)
        assert slowest < 2.5  # usually milliseconds; generous for a loaded machine
        models = httpx.get(f"{base}/v1/models", timeout=TIMEOUT)
        assert models.status_code == 200
        gen.delay = 0.0
        rest = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        r.close()


# -- the command line -------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def trit_serve(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Runs `trit serve ARGS` on a free port until it answers /health; yields
    its URL and the process, and stops it with SIGTERM at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "trit.cli", "serve", "-t", "1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "trit serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_trit_serve_command() -> None:
    args = ["-m", str(MODEL_DIR), "--api-key", "k3y", "--n-ctx", "128", "--log-level", "warning"]
    with trit_serve(*args) as (url, proc):
        c = client(url, api_key="k3y")
        assert [m.id for m in c.models.list()] == ["tiny-gqa-packed"]  # the folder's name
        r = c.chat.completions.create(
            model="tiny-gqa-packed", messages=HI, max_tokens=4, temperature=0
        )
        assert r.usage is not None and r.usage.prompt_tokens == 17
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="nope").models.list()
        too_long = {"model": "tiny-gqa-packed", "prompt": "word " * 200}  # > --n-ctx 128
        raw = httpx.post(f"{url}{COMP}", json=too_long, headers={"Authorization": "Bearer k3y"})
        assert raw.status_code == 400 and "128" in raw.json()["error"]["message"]
    _, err = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode == -signal.SIGTERM, err
    assert "trit serve: model 'tiny-gqa-packed' (n_ctx 128)" in err


def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trit.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_trit_serve_errors() -> None:
    r = serve_cli("-m", str(FIXTURES / "missing"), "--port", str(free_port()))
    assert r.returncode == 1 and r.stderr.startswith("trit: error: no model folder")
    r = serve_cli("-m", str(MODEL_DIR), "--max-concurrency", "0")
    assert r.returncode == 2 and "--max-concurrency" in r.stderr
    for timeout in ("0", "-1", "nan"):
        r = serve_cli("-m", str(MODEL_DIR), "--request-timeout", timeout)
        assert r.returncode == 2 and "--request-timeout" in r.stderr
    r = serve_cli("-m", str(MODEL_DIR), "--max-connections", "0")
    assert r.returncode == 2 and "--max-connections" in r.stderr


def test_trit_serve_without_a_model_serves_the_bundled_one() -> None:
    if models.DEFAULT not in models.names():
        r = serve_cli("--port", str(free_port()))
        assert r.returncode == 1 and "bundled model" in r.stderr
        return
    with trit_serve("--log-level", "warning") as (url, _):
        assert [m.id for m in client(url).models.list()] == [models.DEFAULT]
