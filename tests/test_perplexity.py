"""Sliding-window perplexity against a direct numpy computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, generator
from test_cli import run

from trit import InvalidInputError
from trit._core import Session
from trit.perplexity import windows

TEXT = (FIXTURES / "README.md").read_text()[:2500]


def test_windows_score_every_token_once() -> None:
    for n, ctx, stride in [(10, 4, 2), (10, 4, 4), (100, 16, 5), (7, 32, 16), (33, 8, 1)]:
        scored = [p for _, end, first in windows(n, ctx, stride) for p in range(first, end)]
        spans = windows(n, ctx, stride)
        assert all(end - begin <= ctx for begin, end, _ in spans)
        assert len(scored) == len(set(scored))  # each at most once
        if stride < ctx:
            assert scored == list(range(1, n))  # overlapping windows miss nothing
    # Non-overlapping windows (llama-perplexity) cannot score a window's first token.
    assert [p for _, e, f in windows(10, 4, 4) for p in range(f, e)] == [1, 2, 3, 5, 6, 7, 9]


@pytest.mark.parametrize("ctx,stride", [(64, 32), (64, 64), (48, 7)])
def test_matches_a_direct_computation(ctx: int, stride: int) -> None:
    g = generator("tiny-gqa-packed")
    result = g.perplexity(TEXT, ctx=ctx, stride=stride)
    ids = g.encode(TEXT)
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), ctx, stride):
        logits = g.logits(ids[begin:end]).astype(np.float64)
        for p in range(first, end):
            row = logits[p - begin - 1]
            log_z = math.log(np.exp(row - row.max()).sum()) + row.max()
            total += log_z - row[ids[p]]
            count += 1
    assert result.n_tokens == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-9)
    assert (result.ctx, result.stride) == (ctx, stride)


def test_defaults_and_errors() -> None:
    g = generator("tiny-gqa-packed")
    assert g.perplexity(TEXT).ctx == g.n_ctx
    assert g.perplexity(TEXT).stride == g.n_ctx // 2
    with pytest.raises(InvalidInputError, match="more than the context size"):
        g.perplexity(TEXT, ctx=g.n_ctx + 1)
    with pytest.raises(InvalidInputError, match="stride"):
        g.perplexity(TEXT, ctx=32, stride=33)
    with pytest.raises(InvalidInputError, match="ctx must be at least 2"):
        g.perplexity(TEXT, ctx=1)
    with pytest.raises(InvalidInputError, match="at least 2 tokens"):
        g.perplexity("", ctx=32)


def test_cli(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    out = run("perplexity", "-m", str(FIXTURES / "tiny-gqa-packed"), str(path), "--window", "64")
    assert out.returncode == 0, out.stderr
    expected = generator("tiny-gqa-packed", exact=False).perplexity(TEXT, ctx=64, stride=32)
    assert f"perplexity {expected.ppl:.4f} over {expected.n_tokens} tokens" in out.stdout
    assert "window 64, stride 32" in out.stdout
    out = run("perplexity", "-m", str(FIXTURES / "tiny-gqa-packed"), str(tmp_path / "missing"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_session_nll_checks_the_first_position() -> None:
    g = generator("tiny-gqa-packed")
    s = Session(g.model, threads=1)
    ids = g.encode(TEXT)[:20]
    logits = s.logits(ids).astype(np.float64)
    rows, targets = logits[4:-1], ids[5:]
    log_z = rows.max(axis=1) + np.log(np.exp(rows - rows.max(axis=1)[:, None]).sum(axis=1))
    want = float((log_z - rows[np.arange(len(targets)), targets]).sum())
    assert s.nll(ids, 5) == pytest.approx(want, rel=1e-12)
    assert s.n_tokens == len(ids)
    for first in (0, len(ids), -1):
        with pytest.raises(InvalidInputError, match="first scored position"):
            s.nll(ids, first)
