"""Hostile requests against the real server app with the bundled model: no
request gets a 500 or takes the server down (issue 15, classes 3 and 4).

Hypothesis writes JSON bodies, raw bytes and headers and sends them through
Starlette's TestClient; the targeted tests pin each example of the issue;
the connection tests run uvicorn, with `trit serve`'s settings, on a loopback
port and misbehave on raw sockets. Every wait is bounded."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trit import Generator, models
from trit.server import create_app
from trit.server.app import max_body_bytes
from trit.server.connections import MAX_HEADER_BYTES, uvicorn_config
from trit.server.protocol import MAX_JSON_DEPTH, PromptContext

NAME = "fortunes"
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "Hi!"}]
TIMEOUT = 30.0

# Statuses a request may get: anything else (a 500 above all) fails the test.
EXPECTED_STATUSES = {200, 400, 401, 404, 405, 408, 413, 503}


class Counting(Generator):
    """Counts the prompts it tokenizes and the chats it renders: the server
    must do neither for what it refuses by size, nor for what it does not admit."""

    encoded = 0

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        return super().encode(text, add_special_tokens=add_special_tokens)


def load(folder: Path | None = None, cls: type[Counting] = Counting) -> Any:
    g = cls.from_pretrained(folder or models.path(), threads=1)
    assert isinstance(g, cls)
    encode_chat = g.tokenizer.encode_chat

    def counted(messages: Any) -> list[int]:
        g.encoded += 1
        return encode_chat(messages)

    g.tokenizer.encode_chat = counted  # type: ignore[method-assign]
    return g


@pytest.fixture(scope="module")
def gen() -> Counting:
    return load()


@pytest.fixture(scope="module")
def api(gen: Counting) -> Iterator[TestClient]:
    app = create_app(gen, model_name=NAME, api_key=KEY, max_concurrency=4)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def assert_error(r: Any, status: int | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error (with `status`, if given); returns its fields."""
    assert r.status_code != 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["type"] in ("invalid_request_error", "server_error")
    return dict(err)


def assert_answered(r: Any, *, stream: bool) -> None:
    """Any response the server may give: an OpenAI-shaped error, or a
    completion (whole, or as server-sent events ending in [DONE])."""
    assert r.status_code in EXPECTED_STATUSES, (r.status_code, r.text)
    if r.status_code != 200:
        assert_error(r)
        return
    if not stream:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    for event in events[:-1]:
        assert "error" not in json.loads(event), event


# -- hypothesis: bodies, raw bytes, headers -----------------------------------

LONE_SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(max_size=12) | st.text(st.characters() | LONE_SURROGATES, max_size=6)
NUMBERS = (
    st.integers(-3, 300)
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.sampled_from([10**400, -(10**400), 2**64, -(2**63) - 1])
    | st.floats()  # nan and infinities go out as NaN / Infinity, which json reads
    | st.sampled_from([1e308, -1e308, 5e-324, 1e-300, 3.5e38])
)
LEAVES = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)
SMALL = st.integers(1, 4)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | JSON,
        "content": TEXT
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}))
        | JSON,
    },
    optional={"name": TEXT, "tool_calls": JSON, "refusal": st.none()},
)
FIELDS: dict[str, Any] = {
    "model": st.just(NAME) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "prompt": TEXT | st.lists(st.integers(-2, 5000), max_size=5) | JSON,
    "max_tokens": SMALL | JSON,
    "max_completion_tokens": SMALL | JSON,
    "temperature": NUMBERS | JSON,
    "top_p": NUMBERS | JSON,
    "top_k": NUMBERS | JSON,
    "min_p": NUMBERS | JSON,
    "repetition_penalty": NUMBERS | JSON,
    "seed": NUMBERS | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=3) | JSON,
    "n": NUMBERS | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON}) | JSON,
    "logprobs": st.booleans() | SMALL | JSON,
    "top_logprobs": SMALL | JSON,
    "logit_bias": JSON,
    "frequency_penalty": NUMBERS,
    "presence_penalty": NUMBERS,
    "echo": st.booleans() | JSON,
    "suffix": TEXT | JSON,
    "best_of": NUMBERS | JSON,
    "user": TEXT | JSON,
    "metadata": JSON,
}
# Bodies that reach the model: every field valid, each of trit's options
# somewhere in its range.
VALID_OPTIONS = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 3),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stream": st.booleans(),
    "user": st.text(max_size=8),
}
VALID_CHAT = st.fixed_dictionaries(
    {
        "model": st.just(NAME),
        "max_tokens": SMALL,
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
                    "content": st.text(max_size=30),
                }
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={**VALID_OPTIONS, "logprobs": st.just(True), "top_logprobs": st.integers(0, 20)},
)
VALID_COMPLETION = st.fixed_dictionaries(
    {
        "model": st.just(NAME),
        "max_tokens": SMALL,
        "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 4095), min_size=1),
    },
    optional={**VALID_OPTIONS, "logprobs": st.integers(0, 5)},
)
# One field, valid or not, over a valid body; or any fields at all.
ONE_FIELD = st.dictionaries(st.sampled_from(sorted(FIELDS)), JSON, max_size=1) | st.builds(
    lambda name, value: {name: value}, st.sampled_from(sorted(FIELDS)), NUMBERS
)
REQUESTS = st.sampled_from([CHAT, COMP]).flatmap(
    lambda path: st.tuples(
        st.just(path),
        st.builds(
            lambda body, extra: {**body, **extra},
            VALID_CHAT if path == CHAT else VALID_COMPLETION,
            st.just({}) | ONE_FIELD,
        )
        | st.fixed_dictionaries({}, optional=FIELDS),
    )
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(request=REQUESTS)
def test_fuzzed_bodies_never_get_a_500(api: TestClient, request: tuple[str, Any]) -> None:
    path, body = request
    r = api.post(path, content=json.dumps(body).encode(), headers=AUTH)
    assert_answered(r, stream=body.get("stream") is True)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


RAW = (
    st.binary(max_size=64)
    | st.builds(lambda n: nested(n).encode(), st.integers(1, 3000))
    | st.builds(
        lambda n: f'{{"model": "{NAME}", "metadata": {nested(n)}}}'.encode(), st.integers(1, 2000)
    )
    | st.builds(
        lambda request, cut: json.dumps(request[1]).encode()[:cut], REQUESTS, st.integers(0, 200)
    )
    | st.integers(0, 6000).map(lambda n: b'{"model": "fortunes", "max_tokens": 9%s}' % (b"9" * n))
    | st.integers(0, 600).map(lambda n: b'{"model": "fortunes", "top_p": -1%s}' % (b"0" * n))
    | st.sampled_from(
        [
            b'{"model": "fortunes", "messages": [{"role": "user", "content": "\\ud800"}]}',
            b'{"model": "\\udfff", "prompt": "x"}',
            b'{"\\ud800": 1}',
            "\ufeff{}".encode(),
            '{"model": "fortunes", "prompt": "x"}'.encode("utf-16"),
            b"\x00" * 16,
        ]
    )
)


@FUZZ
@given(path=st.sampled_from([CHAT, COMP]), raw=RAW)
def test_fuzzed_raw_bodies_never_get_a_500(api: TestClient, path: str, raw: bytes) -> None:
    r = api.post(path, content=raw, headers=AUTH)
    # A whole request may survive the cut, "stream": true included.
    streamed = r.headers.get("content-type", "").startswith("text/event-stream")
    assert_answered(r, stream=streamed)


HEADER_VALUE = st.binary(max_size=40).filter(lambda b: not any(c in b for c in b"\r\n\x00"))
AUTH_VALUES = (
    HEADER_VALUE
    | st.sampled_from(
        [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} ", f"Basic {KEY}", KEY, "Bearer"]
    ).map(str.encode)
    | st.builds(lambda b: f"Bearer {KEY}".encode() + b, HEADER_VALUE)
)


@FUZZ
@given(
    auth=st.none() | AUTH_VALUES,
    extra=st.dictionaries(
        st.sampled_from([b"content-type", b"accept", b"x-request-id", b"cookie", b"origin"]),
        HEADER_VALUE,
        max_size=3,
    ),
    path=st.sampled_from([CHAT, COMP, "/v1/models", f"/v1/models/{NAME}"]),
)
def test_fuzzed_headers_never_get_a_500(
    api: TestClient, auth: bytes | None, extra: dict[bytes, bytes], path: str
) -> None:
    headers = dict(extra)
    if auth is not None:
        headers[b"authorization"] = auth
    body = {"model": NAME, "messages": HI, "prompt": "x", "max_tokens": 1}
    if path.startswith("/v1/models"):
        r = api.get(path, headers=headers)
    else:
        body.pop("prompt" if path == CHAT else "messages")
        r = api.post(path, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code in (200, 401), r.text
    if r.status_code == 401:
        assert assert_error(r)["code"] == "invalid_api_key"
    else:
        assert auth is not None and KEY.encode() in auth


# -- class 4: 500s that should be 400s ----------------------------------------


def post(api: TestClient, path: str, raw: bytes | str) -> Any:
    return api.post(path, content=raw.encode() if isinstance(raw, str) else raw, headers=AUTH)


def chat(**fields: Any) -> str:
    return json.dumps({"model": NAME, "messages": HI, "max_tokens": 2, **fields})


@pytest.mark.parametrize(
    "raw,param",
    [
        (chat(top_k=2**64), "top_k"),
        (chat(top_k=2**200), "top_k"),
        (chat(seed=2**64), "seed"),
        (chat(n=2**100), "n"),
        (chat(max_tokens=2**70), "max_tokens"),
        (chat(max_completion_tokens=-(2**70)), "max_completion_tokens"),
        (chat(temperature=2**64), "temperature"),
        (chat()[:-1] + ', "top_p": 1' + "0" * 400 + "}", "top_p"),  # an int beyond float64
        (chat()[:-1] + ', "min_p": -1' + "0" * 400 + "}", "min_p"),
        (chat(repetition_penalty=1e308), "repetition_penalty"),
        (chat(repetition_penalty=1e-300), "repetition_penalty"),
        (chat(repetition_penalty=3.5e38), "repetition_penalty"),
        (chat()[:-1] + ', "temperature": NaN}', "temperature"),
        (chat()[:-1] + ', "top_p": Infinity}', "top_p"),
        (chat(stop=["x" * 10_000]), "stop"),
        (chat(messages=[{"role": "user", "content": "\ud800"}]), "messages"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]),
            "messages",
        ),
        (chat(model="fortunes\udfff"), "model"),
        (chat(stop="\ud83d"), "stop"),
        (chat(user="\ud800"), "user"),
        (chat(metadata=json.loads(nested(MAX_JSON_DEPTH + 5))), "metadata"),
        (json.dumps({"\ud800": 1, "model": NAME}), None),
        (nested(40_000), None),
        ('{"model": "' + NAME + '", "messages": ' + nested(40_000, "{}") + "}", None),
        ('{"model": "' + NAME + '", "max_tokens": ' + "9" * 5000 + "}", None),
    ],
)
def test_values_beyond_every_bound_are_400s_naming_the_field(
    api: TestClient, raw: str, param: str | None
) -> None:
    r = post(api, CHAT, raw)
    err = assert_error(r, 400)
    assert err["param"] == param, err
    assert len(err["message"]) < 400  # the value is quoted, not echoed whole


def test_a_lone_surrogate_in_a_completion_prompt(api: TestClient) -> None:
    r = post(api, COMP, json.dumps({"model": NAME, "prompt": "ab\udbff"}))
    assert assert_error(r, 400)["param"] == "prompt"


def test_max_tokens_is_at_most_the_context(api: TestClient, gen: Counting) -> None:
    ok = post(api, COMP, json.dumps({"model": NAME, "prompt": [1], "max_tokens": gen.n_ctx}))
    assert ok.status_code == 200, ok.text
    r = post(api, COMP, json.dumps({"model": NAME, "prompt": [1], "max_tokens": gen.n_ctx + 1}))
    err = assert_error(r, 400)
    assert err["param"] == "max_tokens" and str(gen.n_ctx) in err["message"]
    card = api.get(f"/v1/models/{NAME}", headers=AUTH).json()
    assert card["max_model_len"] == gen.n_ctx  # clients (the chat page) can know it


def test_docs_and_schema_are_not_served(api: TestClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        for headers in ({}, AUTH):
            r = api.get(path, headers=headers)
            assert r.status_code == 404 and "error" in r.json()


def with_template(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(models.path(), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "template",
    [
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
        "{{ messages[0].content.missing.deeper }}",  # undefined: jinja2's error
        "{{ 1 // (messages | length - 1) }}",  # ZeroDivisionError in the template's code
        "{% for m in messages %}{{ m.content | int + none }}{% endfor %}",  # TypeError
    ],
)
def test_a_chat_template_that_raises_is_a_400(tmp_path: Path, template: str) -> None:
    g = load(with_template(tmp_path, template))
    app = create_app(g, model_name=NAME)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post(CHAT, json={"model": NAME, "messages": HI, "max_tokens": 2})
        err = assert_error(r, 400)
        assert err["param"] == "messages" and "template" in err["message"]
        ok = client.post(COMP, json={"model": NAME, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200  # the server goes on


class Broken(Counting):
    """Fails inside the generation or inside tokenizing, with a message the
    client must not see."""

    fail_in = "stream"

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.fail_in == "encode":
            raise RuntimeError("secret detail of tokenizing")
        return super().encode(text, add_special_tokens=add_special_tokens)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_in == "stream":
            raise RuntimeError("secret detail of generating")
        return super().stream(*args, **kwargs)


def test_a_500_says_only_internal_error(server_logs: list[logging.LogRecord]) -> None:
    g = load(cls=Broken)
    app = create_app(g, model_name=NAME)
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as client:
        for fail_in in ("stream", "encode"):
            g.fail_in = fail_in
            server_logs.clear()
            r = client.post(COMP, json=body)
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "internal error"
            assert "secret" not in r.text
            # logged on the server's side, once
            logged = [x for x in server_logs if x.exc_info and "secret" in str(x.exc_info[1])]
            assert len(logged) == 1 and logged[0].levelno == logging.ERROR
        g.fail_in = "stream"
        r = client.post(COMP, json={**body, "stream": True})
        assert r.status_code == 200 and "secret" not in r.text
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        assert events[-1]["error"]["message"] == "internal error"


# -- class 3: one request must not take the server down ------------------------


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(
    api: TestClient, gen: Counting
) -> None:
    ctx = PromptContext.of(gen)
    too_long = "a" * (ctx.max_prompt_bytes + 1)
    before = gen.encoded
    for path, body in (
        (COMP, {"model": NAME, "prompt": too_long}),
        (CHAT, {"model": NAME, "messages": [{"role": "user", "content": too_long}]}),
        (CHAT, {"model": NAME, "messages": [{"role": "user", "content": ""}] * (gen.n_ctx + 1)}),
    ):
        r = post(api, path, json.dumps(body))
        err = assert_error(r, 400)
        assert err["code"] == "context_length_exceeded", err
    assert gen.encoded == before
    # The bound is a true lower bound: the longest prompt it lets through does
    # get tokenized, and is refused by its token count.
    r = post(api, COMP, json.dumps({"model": NAME, "prompt": "a" * ctx.max_prompt_bytes}))
    assert assert_error(r, 400)["code"] == "context_length_exceeded"
    assert gen.encoded == before + 1


def test_bodies_beyond_the_limit_are_413s(api: TestClient, gen: Counting) -> None:
    limit = max_body_bytes(PromptContext.of(gen))
    big = b" " * (limit + 1)
    r = api.post(CHAT, content=big, headers=AUTH)
    assert assert_error(r, 413)
    assert r.headers["connection"] == "close"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit counts as it reads
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    r = api.post(CHAT, content=chunks(), headers=AUTH)
    assert assert_error(r, 413)
    # the 15 MB prompt: refused from its Content-Length, unread
    body = json.dumps({"model": NAME, "prompt": "a" * (15 << 20)}).encode()
    assert assert_error(api.post(COMP, content=body, headers=AUTH), 413)


@contextmanager
def kept_logs() -> Iterator[list[logging.LogRecord]]:
    """The log records of uvicorn and trit (which do not propagate to the
    root logger, where pytest's caplog listens)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("uvicorn", "trit")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture
def server_logs() -> Iterator[list[logging.LogRecord]]:
    with kept_logs() as records:
        yield records


@contextmanager
def serving(
    app: FastAPI, request_timeout: float
) -> Iterator[tuple[str, int, list[logging.LogRecord]]]:
    """`app` under uvicorn with `trit serve`'s settings, in a thread, on a
    free loopback port; yields its URL, port and log records."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # (uvicorn's logging is configured here, replacing the loggers' handlers)
    config = uvicorn_config(
        app, host="127.0.0.1", port=port, log_level="info", request_timeout=request_timeout
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    with kept_logs() as records:
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "did not start"
                time.sleep(0.01)
            yield f"http://127.0.0.1:{port}", port, records
        finally:
            server.should_exit = True
            thread.join(timeout=20)
            sock.close()
            assert not thread.is_alive(), "the server did not stop"


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and the seconds it took."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # it closed with our bytes unread
            chunk = b""
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


HEAD = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


def test_stalled_connections_are_dropped(gen: Counting) -> None:
    timeout = 1.0
    body = json.dumps({"model": NAME, "messages": HI, "max_tokens": 2}).encode()
    app = create_app(gen, model_name=NAME, request_timeout=timeout)
    with serving(app, timeout) as (url, port, server_logs):
        silent = socket.create_connection(("127.0.0.1", port))
        half_header = socket.create_connection(("127.0.0.1", port))
        half_header.sendall(HEAD.encode())  # no blank line: the headers never end
        half_body = socket.create_connection(("127.0.0.1", port))
        half_body.sendall(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        # a keep-alive connection that starts a second request and stalls in it
        second = socket.create_connection(("127.0.0.1", port))
        second.sendall(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        second.sendall(HEAD.encode())
        for sock, name in ((silent, "silent"), (half_header, "half header"), (second, "second")):
            data, took = read_until_closed(sock, 10)
            assert took < timeout + 5, name
            sock.close()
        assert b" 200 OK" in data  # the first request on `second` was served
        data, took = read_until_closed(half_body, 10)
        half_body.close()
        assert took < timeout + 5 and data.startswith(b"HTTP/1.1 408 "), data
        # headers beyond the bound are refused, not buffered (h11 counts what
        # it holds of an unfinished head: these arrive in pieces)
        with socket.create_connection(("127.0.0.1", port)) as big:
            big.sendall(f"{HEAD}X-Big: ".encode())
            try:
                for _ in range(2 * MAX_HEADER_BYTES // 1024):
                    big.sendall(b"a" * 1024)
                    time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the end
            data, _ = read_until_closed(big, 10)
        assert data.startswith(b"HTTP/1.1 400 "), data[:100]
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    closed = [r for r in server_logs if "no request headers within" in r.getMessage()]
    assert len(closed) == 3  # silent, half_header, second
    assert not [r for r in server_logs if r.levelno >= logging.ERROR]


def test_a_client_leaving_mid_body_is_one_log_line(gen: Counting) -> None:
    with serving(create_app(gen, model_name=NAME), 30.0) as (url, port, server_logs):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"{HEAD}Content-Length: 1000\r\n\r\n".encode() + b'{"model": ')
            time.sleep(0.2)  # the app is reading the body
        deadline = time.monotonic() + 10
        while not any("went away" in r.getMessage() for r in server_logs):
            assert time.monotonic() < deadline, [r.getMessage() for r in server_logs]
            time.sleep(0.02)
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["waiting"] == 0
    lines = [r for r in server_logs if "went away" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert not [r for r in server_logs if r.levelno >= logging.ERROR or r.exc_info]


def test_admission_comes_before_tokenizing() -> None:
    """With the one slot taken, a request gets its 503 without its prompt
    being tokenized or its template rendered."""
    g = load()
    gate = threading.Event()
    original = g.stream

    def held(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(TIMEOUT)
        return original(*args, **kwargs)

    g.stream = held
    with serving(create_app(g, model_name=NAME, max_concurrency=1), 30.0) as (url, _, _):
        with httpx.Client(timeout=TIMEOUT) as http:
            first = threading.Thread(
                target=http.post,
                args=(f"{url}{COMP}",),
                kwargs={"json": {"model": NAME, "prompt": [1, 2], "max_tokens": 2}},
            )
            first.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").json()["running"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            before = g.encoded
            for path, body in (
                (COMP, {"model": NAME, "prompt": "Hello there"}),
                (CHAT, {"model": NAME, "messages": HI}),
            ):
                r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
                assert assert_error(r, 503)["code"] == "server_busy"
            assert g.encoded == before
            gate.set()
            first.join(TIMEOUT)


class Slow(Counting):
    """Sleeps after each token, so that a client can leave mid-generation."""

    def stream(self, *args: Any, on_token: Any = None, **kwargs: Any) -> Any:
        def hook(token: int, logits: Any) -> None:
            time.sleep(0.01)
            if on_token is not None:
                on_token(token, logits)

        return super().stream(*args, on_token=hook, **kwargs)


def test_requests_never_share_a_sequence() -> None:
    """A generation cut off by its client leaves nothing behind in the
    Generator's one cached sequence: the next request, on another prompt or
    the same one, gets what it would alone (greedy, so comparable)."""
    ref = Generator.from_pretrained(models.path(), threads=1)
    prompts = ["Once upon a time", "Once upon a", "Tell me a fortune."]
    alone = {p: ref.generate(p, 24) for p in prompts}
    g = load(cls=Slow)
    with serving(create_app(g, model_name=NAME), 30.0) as (url, _, _):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            for cut, after in zip(prompts, [*prompts[1:], prompts[0]]):
                body = {"model": NAME, "prompt": cut, "max_tokens": 200, "temperature": 0}
                with http.stream("POST", COMP, json={**body, "stream": True}) as r:
                    events = r.iter_lines()
                    assert next(e for e in events if e.startswith("data: "))
                # the cut generation is still stopping while this one queues
                for prompt in (after, cut):
                    body = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
                    got = http.post(COMP, json=body).json()["choices"][0]["text"]
                    assert got == alone[prompt], (cut, prompt)
