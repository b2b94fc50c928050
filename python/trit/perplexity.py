"""Perplexity of a model over a text, with a sliding window.

The text is tokenized once, as the model's tokenizer does by default (a
Llama-3 style tokenizer puts BOS first). Windows of `ctx` tokens start every
`stride` tokens; each scores only the tokens that the previous window did not,
so every token after the first is predicted exactly once, with up to
`ctx - stride` tokens of context carried over. This is the computation of the
transformers documentation ("Perplexity of fixed-length models"); with
`stride == ctx` the windows do not overlap, as in llama-perplexity.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trit._core import InvalidInputError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    ctx: int
    stride: int


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over n tokens."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        # Positions begin+1 .. end-1 are predicted in this window (the first
        # token of a window has nothing before it); score those not yet scored.
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def compute(
    ids: Sequence[int],
    nll_of: Callable[[list[int], int], float],
    *,
    ctx: int,
    stride: int,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of `ids` given `nll_of(window, first)`: the summed negative
    log-likelihood (nats) of `window[first:]`, each token given the ones
    before it (`Session.nll`, which reduces each position's logits in the
    engine, so no [ctx, vocab] array is ever made)."""
    if ctx < 2:
        raise InvalidInputError(f"ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise InvalidInputError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    if len(ids) < 2:
        raise InvalidInputError("the text needs at least 2 tokens")
    spans = windows(len(ids), ctx, stride)
    bar = _progress(len(spans)) if progress else None
    total, count = 0.0, 0
    for begin, end, first in spans:
        total += nll_of(list(ids[begin:end]), first - begin)
        count += end - first
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    nll = total / count
    return Perplexity(ppl=math.exp(nll), nll=nll, n_tokens=count, ctx=ctx, stride=stride)


class _Bar:
    """A minimal progress bar on stderr, for when tqdm is not installed."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        sys.stderr.write(f"\rperplexity: {self.done}/{self.total} windows")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _progress(total: int) -> Any:
    """tqdm's bar (installed with huggingface_hub), else a plain one."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover
        return _Bar(total)
    return tqdm(total=total, desc="perplexity", unit="window", file=sys.stderr)
