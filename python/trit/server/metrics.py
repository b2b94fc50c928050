"""`GET /metrics`: the server's counters, gauges and latency histograms in
Prometheus' text format (`prometheus_client`), one registry per app."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a few ms (a cached prompt on a small model) to minutes (a long
# prompt queued behind others).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class Metrics:
    """What the schedulers record; `state()` is read at every scrape:
    (requests running, requests waiting, KV cache bytes in use)."""

    def __init__(self, slots: int, state: Callable[[], tuple[int, int, int]]) -> None:
        self.registry = r = CollectorRegistry()
        self._state = state
        self.requests = Counter(
            "trit_requests",
            "Requests ended, by finish reason (stop, length, cancelled, error)",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("trit_prompt_tokens", "Prompt tokens of requests", registry=r)
        self.generated_tokens = Counter("trit_generated_tokens", "Tokens generated", registry=r)
        Gauge("trit_slots", "Sequences that can run at once (--parallel)", registry=r).set(slots)
        Gauge("trit_requests_running", "Requests running", registry=r).set_function(
            lambda: self._state()[0]
        )
        Gauge("trit_requests_waiting", "Requests queued for a slot", registry=r).set_function(
            lambda: self._state()[1]
        )
        Gauge(
            "trit_kv_cache_bytes_in_use",
            "Bytes of KV cache that hold tokens (all slots, including cached prefixes)",
            registry=r,
        ).set_function(lambda: self._state()[2])
        self.time_to_first_token = Histogram(
            "trit_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "trit_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "trit_request_duration_seconds",
            "From a request's arrival to its end",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "trit_batch_size",
            "Sequences in each forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def ended(
        self,
        reason: str,
        arrived: float,
        first_token: float | None,
        prompt_tokens: int,
        new_tokens: int,
    ) -> None:
        """Records a request that ended (times from `time.perf_counter`)."""
        now = time.perf_counter()
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(new_tokens)
        self.request_duration.observe(now - arrived)
        if first_token is not None:
            self.time_to_first_token.observe(first_token - arrived)
            if new_tokens > 1:
                self.time_per_output_token.observe((now - first_token) / (new_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
