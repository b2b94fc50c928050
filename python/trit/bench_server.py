"""`trit bench --server URL`: a load test of a running `trit serve` on this machine.

`clients` threads send `requests` streaming chat completions in all and read
each stream to its end. Reported: requests/s, generated tokens/s (from each
stream's usage), and time to first token and end-to-end latency, p50 and p99.
Every request has a timeout and the counts are bounded. Loopback only: a load
test aimed at someone else's server would be an attack, so other hosts are
refused. The standard library's HTTP client, so no extra is needed.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import queue
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

MAX_CLIENTS = 256
MAX_REQUESTS = 10_000
MAX_TIMEOUT_S = 3600.0


@dataclass
class LoadResult:
    url: str
    model: str
    clients: int
    requests: int
    max_tokens: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float  # generated tokens of all requests / wall time
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


class _Client:
    """One keep-alive connection to the server."""

    def __init__(self, host: str, port: int, timeout: float, api_key: str | None) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def get_json(self, path: str) -> dict[str, object]:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
        data: dict[str, object] = json.loads(body)
        return data

    def stream(self, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        """(seconds to the first token, seconds to the end, generated tokens) of one request."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body), self.headers)
        response = self.conn.getresponse()
        if response.status != 200:
            raise RuntimeError(
                f"POST /v1/chat/completions: HTTP {response.status}: {response.read()[:200]!r}"
            )
        first: float | None = None
        tokens = 0
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
        response.read()  # the rest, so the connection can be reused
        end = time.perf_counter() - start
        return (end if first is None else first), end, tokens

    def close(self) -> None:
        self.conn.close()


def run(
    url: str,
    *,
    clients: int = 8,
    requests: int = 32,
    max_tokens: int = 64,
    timeout: float = 300.0,
    api_key: str | None = None,
    progress: Callable[[str], object] | None = None,
) -> LoadResult:
    """Runs the load test; see the module docstring."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--server must be an http:// URL, got {url!r}")
    if not is_loopback(parts.hostname):
        raise ValueError(
            f"--server {url!r}: the load test only targets a server on this machine "
            "(127.0.0.1, ::1 or localhost)"
        )
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"--clients must be in 1..{MAX_CLIENTS}, got {clients}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be in 1..{MAX_REQUESTS}, got {requests}")
    if max_tokens < 1:
        raise ValueError(f"-n must be >= 1, got {max_tokens}")
    if not 0 < timeout <= MAX_TIMEOUT_S:  # also refuses nan
        raise ValueError(f"--timeout must be > 0 and <= {MAX_TIMEOUT_S} seconds, got {timeout}")
    host, port = parts.hostname, parts.port or 80
    if progress is not None:
        progress(f"{url}: {requests} requests of up to {max_tokens} tokens from {clients} clients")

    probe = _Client(host, port, timeout, api_key)
    try:
        listed = probe.get_json("/v1/models").get("data")
        if not isinstance(listed, list) or not listed:
            raise RuntimeError("GET /v1/models: the server lists no model")
        model = str(listed[0]["id"])
    finally:
        probe.close()

    prompts: queue.SimpleQueue[str] = queue.SimpleQueue()
    for i in range(requests):
        prompts.put(f"Tell me story number {i}.")

    def worker() -> list[tuple[float, float, int]]:
        """One client: one connection, the next prompt as soon as a reply ends."""
        client = _Client(host, port, timeout, api_key)
        out: list[tuple[float, float, int]] = []
        try:
            while True:
                try:
                    prompt = prompts.get_nowait()
                except queue.Empty:
                    return out
                out.append(client.stream(model, prompt, max_tokens))
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker) for _ in range(clients)]
        results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    e2e = [r[1] for r in results]
    return LoadResult(
        url=url,
        model=model,
        clients=clients,
        requests=requests,
        max_tokens=max_tokens,
        wall_s=wall,
        requests_per_s=requests / wall,
        tokens_per_s=sum(r[2] for r in results) / wall,
        ttft_p50_s=statistics.median(ttft),
        ttft_p99_s=percentile(ttft, 0.99),
        e2e_p50_s=statistics.median(e2e),
        e2e_p99_s=percentile(e2e, 0.99),
    )


def markdown(r: LoadResult) -> str:
    return "\n".join(
        [
            f"{r.url} ({r.model}): {r.requests} requests of up to {r.max_tokens} tokens "
            f"from {r.clients} clients in {r.wall_s:.2f} s",
            "",
            "| requests/s | tokens/s | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | {r.ttft_p50_s:.3f} s "
            f"| {r.ttft_p99_s:.3f} s | {r.e2e_p50_s:.3f} s | {r.e2e_p99_s:.3f} s |",
        ]
    )


__all__ = ["LoadResult", "is_loopback", "markdown", "run"]
