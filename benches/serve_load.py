"""A load test of a running `trit serve` on this machine: C clients send R
streaming chat requests in all, with the official openai client; reports
requests/s, aggregate tokens/s, and time-to-first-token and end-to-end
latency percentiles (p50, p99). Loopback only, every call bounded.

    trit serve --parallel 8 &        # and, to compare, --parallel 1
    python benches/serve_load.py --url http://127.0.0.1:8000 -c 8 -r 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def one(
    client: openai.OpenAI, model: str, prompt: str, max_tokens: int
) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens) of one request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - t0
    return (end if first is None else first), end, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("-c", "--clients", type=int, default=8)
    p.add_argument("-r", "--requests", type=int, default=32)
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error("the load test only targets a server on this machine (127.0.0.1)")
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10_000):
        p.error("-c must be in 1..256 and -r in 1..10000")
    client = openai.OpenAI(
        base_url=f"{args.url}/v1", api_key=args.api_key, timeout=args.timeout, max_retries=0
    )
    model = client.models.list().data[0].id
    prompts = [f"Tell me story number {i}." for i in range(args.requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda q: one(client, model, q, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    e2e = [r[1] for r in results]
    summary = {
        "clients": args.clients,
        "requests": args.requests,
        "requests_per_s": args.requests / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "e2e_p50_s": statistics.median(e2e),
        "e2e_p99_s": percentile(e2e, 0.99),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
