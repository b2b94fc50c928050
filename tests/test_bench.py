"""trit bench on fixture models and on a small synthetic checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES
from test_cli import run

from trit import bench, synthetic
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
        assert r.read_bandwidth_gbs > 0 and r.roofline_ts > 0 and r.load_s > 0
        assert r.peak_rss_bytes > r.model_size > 0
        assert (r.n_prompt == 0) != (r.n_gen == 0)
        assert (r.roofline_fraction > 0) == (r.n_gen > 0)
        assert (r.head, r.type_k, r.type_v) == ("int8", "f16", "f16")
    # A filled cache adds its keys and values to what a token reads.
    assert results[2].roofline_ts < results[1].roofline_ts
    assert "| tg4 @ d16 |" in bench.markdown(results)


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
