"""`trit bench`: prompt processing and generation speed, llama-bench style.

Each test runs once untimed (warm-up), then `repetitions` times:
- ``pp N``: a prompt of N tokens processed from an empty cache (one batched pass);
- ``tg N``: N tokens generated one at a time after `depth` tokens already in
  the cache (``tg N @ dD``), each decode computing the full logits.
Token ids are random (seeded): speed does not depend on them.

Alongside tokens/s it reports the roofline: generating a token reads every
weight once, so `bytes_per_token / read_bandwidth` bounds generation speed,
with the read bandwidth measured in the same run with the same thread count:
once before the tests and once after them, keeping the higher figure. On a
shared machine the bandwidth left to one process drifts by tens of percent
within a minute; the better of two readings is the more conservative roofline.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from trit import synthetic
from trit._core import Model, Session, active_kernel, read_bandwidth
from trit.loader import load_model, resolve

# The buffer summed to measure read bandwidth: many times any L3 cache.
BANDWIDTH_BYTES = 512 << 20


@dataclass
class BenchResult:
    """One test; field names follow llama-bench's JSON where it has one."""

    model: str
    model_size: int  # bytes of weights in memory
    head: str  # precision of the output head
    type_k: str  # KV cache precision (llama-bench's name; keys and values alike)
    type_v: str
    n_threads: int
    n_prompt: int  # tokens of a pp test (0 for tg)
    n_gen: int  # tokens of a tg test (0 for pp)
    n_ctx: int  # tokens already in the cache when a tg test starts (its depth)
    avg_ts: float  # tokens per second, mean over repetitions
    stddev_ts: float
    samples_ts: list[float] = field(default_factory=list)
    kernel: str = ""
    read_bandwidth_gbs: float = 0.0
    roofline_ts: float | None = None  # the most tg tokens/s memory allows (tg tests)
    roofline_fraction: float | None = None  # avg_ts / roofline_ts (tg tests; none for pp)
    peak_rss_bytes: int = 0
    load_s: float = 0.0
    packing: str = "i2"  # how the ternary weights are stored ("i2", "tq1" or "tl")
    # Bytes a generated token reads at the test's depth: every weight (the
    # output head in its precision, `head`) and the cached keys and values;
    # roofline_ts is read_bandwidth_gbs over it.
    bytes_per_token: int = 0

    @property
    def test(self) -> str:
        if self.n_prompt:
            return f"pp{self.n_prompt}"
        return f"tg{self.n_gen}" + (f" @ d{self.n_ctx}" if self.n_ctx else "")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _reset_peak_rss() -> None:
    """Starts peak-RSS accounting afresh (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time(
    fn: Callable[[], object], repetitions: int, setup: Callable[[], object] = lambda: None
) -> list[float]:
    """Seconds of each of `repetitions` calls of `fn`, after one untimed call;
    `setup` runs, untimed, before each."""
    out = []
    for rep in range(repetitions + 1):
        setup()
        start = time.perf_counter()
        fn()
        if rep:
            out.append(time.perf_counter() - start)
    return out


def _summary(tokens: int, seconds: list[float]) -> tuple[float, float, list[float]]:
    rates = [tokens / s for s in seconds]
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return statistics.fmean(rates), sd, rates


def run(
    model: str | None = None,
    *,
    synthetic_name: str | None = None,
    n_prompt: Sequence[int] = (128,),
    n_gen: Sequence[int] = (128,),
    threads: Sequence[int] = (1, 2),
    depths: Sequence[int] = (0,),
    repetitions: int = 5,
    seed: int = 0,
    progress: object = None,
    head: str = "int8",
    kv_cache: str = "auto",
    packing: str = "i2",
) -> list[BenchResult]:
    """Runs every test for every thread count; see the module docstring."""
    if (model is None) == (synthetic_name is None):
        raise ValueError("give a model or a synthetic model name, not both")
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    for name, values in (("-p", n_prompt), ("-n", n_gen), ("-d/--depth", depths)):
        if any(v < 0 for v in values):
            raise ValueError(f"{name} values must be >= 0, got {list(values)}")
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"thread counts must be >= 1, got {list(threads)}")
    say: Callable[[str], object] = progress if callable(progress) else (lambda _msg: None)

    if synthetic_name is not None:
        say(f"synthetic model {synthetic_name}: preparing its checkpoint (once)")
        folder = synthetic.ensure(synthetic_name)
        label = f"synthetic-{synthetic.ALIASES.get(synthetic_name, synthetic_name)}"
    else:
        assert model is not None
        folder = resolve(model)
        label = Path(model).name if Path(model).is_dir() else str(model)

    # Bandwidth first: its buffer must not count in the model's peak memory.
    bandwidths = {}
    for n_threads in threads:
        say(f"{n_threads} thread(s): measuring read bandwidth")
        bandwidths[n_threads] = read_bandwidth(BANDWIDTH_BYTES, n_threads, 5)

    _reset_peak_rss()
    start = time.perf_counter()
    loaded: Model = load_model(folder, head=head, packing=packing)
    load_s = time.perf_counter() - start
    cfg = loaded.config
    size, per_token = loaded.weight_bytes, loaded.bytes_per_token
    rng = np.random.default_rng(seed)
    # A tg test starts from at least one token: max(depth, 1) + n positions.
    longest = max([*n_prompt, *(max(d, 1) + n for d in depths for n in n_gen), 1])
    if longest > cfg.max_position_embeddings:
        raise ValueError(
            f"the tests need {longest} positions but the model has {cfg.max_position_embeddings}"
        )
    ids = [int(i) for i in rng.integers(0, cfg.vocab_size, size=longest)]
    kernel = active_kernel()

    results = []
    token_bytes = []  # bytes each result's generated tokens read, for its roofline
    for n_threads in threads:
        session = Session(loaded, n_ctx=longest, threads=n_threads, kv_cache=kv_cache)
        # Bytes of keys and values one cached position adds to every token's reads.
        kv_per_position = session.cache_bytes // session.n_ctx
        for n_p, n_g, depth, seconds in _timings(
            session, ids, n_prompt, n_gen, depths, repetitions, say, n_threads
        ):
            avg, sd, rates = _summary(n_p or n_g, seconds)
            bytes_per_token = per_token + kv_per_position * depth
            results.append(
                BenchResult(
                    model=label,
                    model_size=size,
                    head=head,
                    type_k=session.kv_cache,
                    type_v=session.kv_cache,
                    n_threads=n_threads,
                    n_prompt=n_p,
                    n_gen=n_g,
                    n_ctx=depth,
                    avg_ts=avg,
                    stddev_ts=sd,
                    samples_ts=rates,
                    kernel=kernel,
                    load_s=load_s,
                    packing=loaded.packing,
                )
            )
            token_bytes.append(bytes_per_token)
        del session  # its KV cache, before the next one is made
    peak = peak_rss_bytes()
    # The second reading, after peak memory was taken (the model is still loaded).
    for n_threads in threads:
        say(f"{n_threads} thread(s): measuring read bandwidth again")
        again = read_bandwidth(BANDWIDTH_BYTES, n_threads, 5)
        bandwidths[n_threads] = max(bandwidths[n_threads], again)
    for r, n_bytes in zip(results, token_bytes):
        r.peak_rss_bytes = peak
        r.bytes_per_token = n_bytes
        r.read_bandwidth_gbs = bandwidths[r.n_threads]
        if r.n_gen:
            r.roofline_ts = r.read_bandwidth_gbs * 1e9 / n_bytes
            r.roofline_fraction = r.avg_ts / r.roofline_ts
    return results


def _timings(
    session: Session,
    ids: list[int],
    n_prompt: Sequence[int],
    n_gen: Sequence[int],
    depths: Sequence[int],
    repetitions: int,
    say: Callable[[str], object],
    n_threads: int,
) -> list[tuple[int, int, int, list[float]]]:
    """(n_prompt, n_gen, depth, seconds per repetition) of every test."""
    out = []
    for n_p in (p for p in n_prompt if p > 0):
        say(f"{n_threads} thread(s): pp{n_p}")
        prompt = ids[:n_p]
        seconds = _time(partial(session.prefill, prompt), repetitions, setup=session.reset)
        out.append((n_p, 0, 0, seconds))
    for depth in depths:
        for n_g in (n for n in n_gen if n > 0):
            say(f"{n_threads} thread(s): tg{n_g}" + (f" at depth {depth}" if depth else ""))
            # A tg test needs one token to start from; at depth 0 it is the first id.
            context = ids[: max(depth, 1)]
            tokens = ids[depth : depth + n_g]

            def tg(tokens: list[int] = tokens) -> None:
                for token in tokens:
                    session.push(token)

            # Back to just the context before each run: the cached prefix is
            # reused, so this re-runs a single token, untimed.
            seconds = _time(tg, repetitions, setup=partial(session.prefill, context))
            out.append((0, n_g, depth, seconds))
    return out


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def markdown(results: Sequence[BenchResult]) -> str:
    """A llama-bench style table, plus the memory and load figures."""
    lines = [
        "| model | size | head | packing | kv | kernel | threads | test | t/s | roofline t/s "
        "| of roofline |",
        "|---|---:|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        frac = f"{100 * r.roofline_fraction:.0f} %" if r.roofline_fraction is not None else ""
        roof = f"{r.roofline_ts:.1f}" if r.roofline_ts is not None else ""
        # One repetition has no spread to show.
        spread = f" ± {r.stddev_ts:.2f}" if len(r.samples_ts) > 1 else ""
        lines.append(
            f"| {r.model} | {_gib(r.model_size)} | {r.head} | {r.packing} | {r.type_k} "
            f"| {r.kernel} "
            f"| {r.n_threads} "
            f"| {r.test} | {r.avg_ts:.2f}{spread} | {roof} | {frac} |"
        )
    if results:
        r = results[0]
        bw = ", ".join(
            f"{t.n_threads}t {t.read_bandwidth_gbs:.1f} GB/s"
            for t in {x.n_threads: x for x in results}.values()
        )
        lines.append("")
        # The fewest: the weights alone, at depth 0 (a pp row is at depth 0).
        weights = min(x.bytes_per_token for x in results)
        lines.append(
            f"load {r.load_s:.2f} s, peak RSS {_gib(r.peak_rss_bytes)}, read bandwidth {bw}, "
            f"{_gib(weights)} of weights read per generated token ({r.head} head)"
        )
    return "\n".join(lines)


def env_threads() -> list[int]:
    """Default thread counts: 1 and the physical cores (TRIT_NUM_THREADS if set)."""
    from trit._core import default_threads

    n = default_threads()
    return [1] if n == 1 else [1, n]


__all__ = ["BenchResult", "env_threads", "markdown", "peak_rss_bytes", "run"]
