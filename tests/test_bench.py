"""trit bench on fixture models and on a small synthetic checkpoint; its --batch
mode, and its --server load test against a `trit serve` on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES
from test_cli import run
from test_server import free_port, trit_serve

from trit import bench, bench_batch, bench_server, synthetic
from trit.loader import load_model, model_config

MODEL = str(FIXTURES / "tiny-gqa-packed")


def test_run_reports_every_test() -> None:
    results = bench.run(
        MODEL, n_prompt=[8], n_gen=[4], threads=[1, 2], depths=[0, 16], repetitions=2
    )
    assert [(r.n_threads, r.test) for r in results] == [
        (1, "pp8"),
        (1, "tg4"),
        (1, "tg4 @ d16"),
        (2, "pp8"),
        (2, "tg4"),
        (2, "tg4 @ d16"),
    ]
    for r in results:
        assert r.avg_ts > 0 and len(r.samples_ts) == 2
        assert r.read_bandwidth_gbs > 0 and r.load_s > 0
        assert r.peak_rss_bytes > r.model_size > 0
        assert (r.n_prompt == 0) != (r.n_gen == 0)
        # A roofline bounds generation only: a pp row carries none.
        if r.n_gen:
            assert r.roofline_ts is not None and r.roofline_ts > 0
            assert r.roofline_fraction is not None and r.roofline_fraction > 0
        else:
            assert r.roofline_ts is None and r.roofline_fraction is None
        assert (r.head, r.type_k, r.type_v) == ("int8", "f16", "f16")
    # A filled cache adds its keys and values to what a token reads.
    assert results[1].roofline_ts is not None and results[2].roofline_ts is not None
    assert results[2].roofline_ts < results[1].roofline_ts
    assert "| tg4 @ d16 |" in bench.markdown(results)


def test_the_q6_head_reads_fewer_bytes_per_token() -> None:
    """The head's bytes come from the matrix as held: the fixture's tied
    512 × 64 head is 512 × (64 + 4) bytes as int8 rows and 512 × (56 + 4) as
    q6 rows (one group of 64 columns: 48 code bytes, the 8 sub-scales of its
    band, which would hold four groups, and a step per row), and the roofline
    moves with them."""
    int8, q6 = (
        bench.run(MODEL, n_prompt=[], n_gen=[2], threads=[1], repetitions=1, head=head)[0]
        for head in ("int8", "q6")
    )
    assert (int8.head, q6.head) == ("int8", "q6")
    assert int8.bytes_per_token - q6.bytes_per_token == 512 * (64 - 56)
    assert int8.model_size - q6.model_size == 512 * (64 - 56)
    assert int8.roofline_ts is not None and q6.roofline_ts is not None
    ratio = int8.bytes_per_token / q6.bytes_per_token
    assert q6.roofline_ts / q6.read_bandwidth_gbs == pytest.approx(
        ratio * int8.roofline_ts / int8.read_bandwidth_gbs
    )
    assert "(q6 head)" in bench.markdown([q6])


def test_roofline_uses_the_better_of_two_bandwidth_readings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Readings in call order: before the tests (1t, 2t), then after them.
    readings = iter([10.0, 30.0, 12.0, 25.0])
    calls = []

    def fake_bandwidth(n_bytes: int, threads: int, reps: int) -> float:
        calls.append(threads)
        return next(readings)

    monkeypatch.setattr(bench, "read_bandwidth", fake_bandwidth)
    results = bench.run(MODEL, n_prompt=[4], n_gen=[2], threads=[1, 2], repetitions=1)
    assert calls == [1, 2, 1, 2]
    tg1, tg2 = (r for r in results if r.n_gen)
    assert (tg1.read_bandwidth_gbs, tg2.read_bandwidth_gbs) == (12.0, 30.0)
    model = load_model(Path(MODEL))
    assert tg1.roofline_ts == pytest.approx(12e9 / model.bytes_per_token)
    assert tg2.roofline_fraction == pytest.approx(tg2.avg_ts / (30e9 / model.bytes_per_token))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repetitions"):
        bench.run(MODEL, repetitions=0)
    with pytest.raises(ValueError, match="positions"):
        bench.run(MODEL, n_gen=[300], threads=[1])
    with pytest.raises(ValueError, match="not both"):
        bench.run(MODEL, synthetic_name="2b4t")


def test_cli_json() -> None:
    out = run("bench", "-m", MODEL, "-p", "8", "-n", "4", "-t", "1", "-r", "1", "--json")
    assert out.returncode == 0, out.stderr
    (pp, tg) = json.loads(out.stdout)
    keys = ("n_prompt", "n_gen", "n_threads", "avg_ts", "stddev_ts", "model_size", "type_k")
    for key in keys:
        assert key in pp and key in tg
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (8, 0, 0, 4)
    assert tg["roofline_fraction"] > 0 and tg["kernel"] and tg["peak_rss_bytes"] > 0
    assert pp["packing"] == tg["packing"] == "i2"
    assert pp["roofline_fraction"] is None and pp["roofline_ts"] is None


@pytest.mark.parametrize("packing", ["tq1", "tl"])
def test_cli_packing_is_reported_and_checked(packing: str) -> None:
    """--packing tq1 or tl: the rows say so, and the model's ternary bytes are
    fewer (52/64 or 51.2/64); an unknown value is refused naming the flag."""
    args = ("bench", "-m", MODEL, "-p", "8", "-n", "4", "-t", "1", "-r", "1", "--json")
    i2 = json.loads(run(*args).stdout)
    small = json.loads(run(*args, "--packing", packing).stdout)
    assert {r["packing"] for r in small} == {packing}
    assert small[0]["model_size"] < i2[0]["model_size"]
    table = run(*args[:-1], "--packing", packing)
    assert table.returncode == 0, table.stderr
    assert "| packing |" in table.stdout and f"| {packing} |" in table.stdout
    bad = run(*args, "--packing", "tq2")
    assert bad.returncode == 2 and "--packing" in bad.stderr


def test_cli_table_shows_a_spread_only_over_repetitions() -> None:
    args = ("bench", "-m", MODEL, "-p", "8", "-n", "4", "-t", "1")
    once = run(*args, "-r", "1")
    assert once.returncode == 0, once.stderr
    assert "| pp8 |" in once.stdout and "±" not in once.stdout
    twice = run(*args, "-r", "2")
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout.count("±") == 2  # pp8 and tg4


def test_synthetic_checkpoint_loads_through_the_real_loader(tmp_path: Path) -> None:
    shape = synthetic.Shape("test", 96, 160, 2, 6, 2, 300, tied=False, max_positions=64)
    synthetic.write(shape, tmp_path)
    config, _ = model_config(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (96, 2, 300)
    model = load_model(tmp_path)
    proj = model.projection(1, "down_proj")
    assert proj.shape == (96, 160)
    assert set(proj.unpack().ravel().tolist()) == {-1, 0, 1}
    # Untied: embedding and head, bf16, 96 x 300 each.
    assert model.bytes_per_token > 300 * 96 * 2


def test_synthetic_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = synthetic.Shape("test", 64, 96, 1, 4, 4, 128, tied=True, max_positions=32)
    monkeypatch.setitem(synthetic.SHAPES, "tiny", tiny)
    folder = synthetic.ensure("tiny", root=tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert synthetic.ensure("tiny", root=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown synthetic model"):
        synthetic.ensure("70b", root=tmp_path)


# -- trit bench --batch ---------------------------------------------------------


def test_batch_run_reports_every_batch_size() -> None:
    results = bench_batch.run(MODEL, batches=[1, 3], n_prompt=5, n_gen=3, threads=1)
    assert [(r.batch, r.n_prompt, r.n_gen, r.n_threads) for r in results] == [
        (1, 5, 3, 1),
        (3, 5, 3, 1),
    ]
    pp128 = results[0].pp128_ts
    assert pp128 > 0
    for r in results:
        assert r.pp_ts > 0 and r.tg_ts > 0
        assert r.tg_ts_per_sequence == pytest.approx(r.tg_ts / r.batch)
        assert (r.pp128_ts, r.tg_of_pp128) == (pp128, pytest.approx(r.tg_ts / pp128))
        assert (r.type_k, r.type_v, r.model) == ("f16", "f16", "tiny-gqa-packed")
    table = bench_batch.markdown(results)
    assert "pp128 (one sequence)" in table and "| 3 | 5 | 3 |" in table


def test_batch_repetitions_alternate_and_report_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each repetition runs the reference and then every batch size, and every
    # reported rate is the median of its repetitions.
    calls: list[object] = []
    pp_rates = iter([1.0, 100.0, 300.0, 200.0])  # the first: the warm-up
    tg_seconds = {1: iter([1.0, 3.0, 2.0]), 3: iter([6.0, 2.0, 4.0])}

    def fake_pp_rate(engine: object, ids: list[int]) -> float:
        calls.append("pp")
        return next(pp_rates)

    def fake_batched(
        model: object, prompts: list[list[int]], n_gen: int, threads: object, kv_cache: str
    ) -> tuple[float, float]:
        calls.append(len(prompts))
        return 0.5, next(tg_seconds[len(prompts)])

    monkeypatch.setattr(bench_batch, "pp_rate", fake_pp_rate)
    monkeypatch.setattr(bench_batch, "batched", fake_batched)
    results = bench_batch.run(MODEL, batches=[1, 3], n_prompt=5, n_gen=6, repetitions=3)
    assert calls == ["pp"] + ["pp", 1, 3] * 3
    assert [r.repetitions for r in results] == [3, 3]
    assert [r.pp128_ts for r in results] == [200.0, 200.0]
    assert [r.tg_ts for r in results] == [6 / 2.0, 3 * 6 / 4.0]
    assert [r.pp_ts for r in results] == [5 / 0.5, 3 * 5 / 0.5]
    assert [r.tg_of_pp128 for r in results] == [3.0 / 200.0, 4.5 / 200.0]
    assert "medians of 3 repetitions" in bench_batch.markdown(results)


def test_batch_bad_arguments() -> None:
    with pytest.raises(ValueError, match="--batch sizes"):
        bench_batch.run(MODEL, batches=[2, 0])
    with pytest.raises(ValueError, match="-p and -n"):
        bench_batch.run(MODEL, batches=[1], n_gen=0)
    with pytest.raises(ValueError, match="positions"):
        bench_batch.run(MODEL, batches=[1], n_prompt=200, n_gen=200)
    with pytest.raises(ValueError, match="not both"):
        bench_batch.run(MODEL, synthetic_name="2b4t")
    with pytest.raises(ValueError, match="-r must be"):
        bench_batch.run(MODEL, batches=[1], repetitions=0)


def test_cli_batch_json_per_thread_count() -> None:
    out = run("bench", "-m", MODEL, "--batch", "1,2", "-p", "4", "-n", "2", "-t", "1,2", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["n_threads"], r["batch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["tg_ts"] > 0 and r["pp128_ts"] > 0 for r in rows)


def test_cli_batch_table_and_refused_flags() -> None:
    out = run("bench", "--batch", "2", "-p", "4", "-n", "2", "-t", "1")  # the bundled model
    assert out.returncode == 0, out.stderr
    assert "| 2 | 4 | 2 |" in out.stdout and "[batch 2:" in out.stderr
    for extra, message in (
        (("-r", "0"), "-r must be in [1, 100]"),
        (("-d", "8"), "-d does not apply to --batch"),
        (("-p", "4,8"), "-p takes one value with --batch"),
        (("--clients", "2"), "--clients does not apply to --batch"),
        (("--api-key", "k"), "--api-key does not apply to --batch"),
    ):
        bad = run("bench", "-m", MODEL, "--batch", "1", *extra)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    for extra in (("--requests", "3"), ("--timeout", "9")):
        bad = run("bench", "-m", MODEL, *extra)
        assert bad.returncode == 2 and f"{extra[0]} needs --server" in bad.stderr, bad.stderr


# -- trit bench --server --------------------------------------------------------


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples over its labels."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def test_cli_server_load_test_against_trit_serve() -> None:
    args = ("-m", MODEL, "--parallel", "2", "--api-key", "k3y", "--log-level", "warning")
    with trit_serve(*args) as (url, _proc):
        load = ("bench", "--server", url, "--clients", "2", "--requests", "3", "-n", "4")
        out = run(*load, "--api-key", "k3y", "--json")
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert (r["url"], r["model"], r["clients"], r["requests"]) == (
            url,
            "tiny-gqa-packed",
            2,
            3,
        )
        assert r["requests_per_s"] == pytest.approx(3 / r["wall_s"])
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["wall_s"]
        assert 0 < r["e2e_p50_s"] <= r["e2e_p99_s"] <= r["wall_s"]
        assert r["ttft_p50_s"] <= r["e2e_p50_s"]
        # The tokens it counted are the ones the server generated.
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k3y"}).text
        generated = _metric(metrics, "trit_generated_tokens_total")
        assert 0 < generated <= 3 * 4
        assert r["tokens_per_s"] * r["wall_s"] == pytest.approx(generated)
        assert _metric(metrics, "trit_requests_total") == 3
        table = run(*load, "--api-key", "k3y")
        assert table.returncode == 0 and "| requests/s |" in table.stdout, table.stderr
        # Without its key the server answers 401 to the first call.
        denied = run(*load)
        assert denied.returncode == 1 and "401" in denied.stderr, denied.stderr


def test_cli_server_refuses_other_hosts_and_bad_counts() -> None:
    for url, message in (
        ("http://192.0.2.1:8000", "only targets a server on this machine"),
        ("http://example.com", "only targets a server on this machine"),
        ("https://127.0.0.1:8000", "must be an http:// URL"),
    ):
        out = run("bench", "--server", url)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for extra, message in (
        (("--clients", "0"), "--clients must be in 1..256"),
        (("--requests", "100000"), "--requests must be in 1..10000"),
        (("--timeout", "0"), "--timeout must be > 0"),
        (("--timeout", "inf"), "--timeout must be > 0"),
        (("--timeout", "nan"), "--timeout must be > 0"),
        (("-t", "2"), "-t does not apply to --server"),
        (("-m", MODEL), "-m does not apply to --server"),
    ):
        out = run("bench", "--server", url, *extra)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    refused = run("bench", "--server", url, "--requests", "1")
    assert refused.returncode == 1 and "refused" in refused.stderr.lower(), refused.stderr


def test_loopback_and_percentiles() -> None:
    assert all(map(bench_server.is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(bench_server.is_loopback, ["10.0.0.1", "0.0.0.0", "example.com", "::"]))
    values = [float(v) for v in range(1, 101)]
    assert bench_server.percentile(values, 0.5) == 50.0
    assert bench_server.percentile(values, 0.99) == 99.0
    assert bench_server.percentile([3.0], 0.99) == 3.0
