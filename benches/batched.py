"""Batched decoding, in the style of llama-batched-bench: for each batch size
B, B sequences each get a prompt of `-p` tokens (one step for all of them),
then `-n` steps decode one token per sequence. Reports the prompt rate, the
aggregate generation rate (B x n tokens / s) and the rate per sequence, beside
the pp128 rate of a single sequence in the same run (the GEMM bound that
batched decoding approaches).

    python benches/batched.py --synthetic 2b4t -t 2 -b 1,2,4,8,16
    python benches/batched.py -m path/to/model -b 1,8

Token ids are random (seeded): speed does not depend on them. Everything is
bounded by the arguments; nothing is downloaded except a Hub model named by -m.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from trit import synthetic
from trit._core import Engine, Model, Sampler
from trit.loader import load_model, resolve


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def pp_rate(model: Model, ids: list[int], threads: int, kv_cache: str) -> float:
    """Tokens/s of one prompt of len(ids) tokens (best of three)."""
    engine = Engine(model, slots=1, n_ctx=len(ids), threads=threads, kv_cache=kv_cache)
    best = 0.0
    for _ in range(3):
        slot = engine.acquire([])
        engine.reset(slot)
        t0 = time.perf_counter()
        engine.step([(slot, ids, True)])
        best = max(best, len(ids) / (time.perf_counter() - t0))
        engine.release(slot)
    return best


def batched(
    model: Model, batch: int, ids: np.ndarray, n_gen: int, threads: int, kv_cache: str
) -> dict[str, float]:
    """One run of `batch` sequences: prompts (rows of `ids`) then n_gen steps."""
    n_prompt = ids.shape[1]
    engine = Engine(model, slots=batch, n_ctx=n_prompt + n_gen, threads=threads, kv_cache=kv_cache)
    greedy = Sampler()
    slots = [engine.acquire([]) for _ in range(batch)]
    prompts = [[int(t) for t in ids[b]] for b in range(batch)]
    t0 = time.perf_counter()
    # Prompts in steps of at most 256 tokens, as the Generator's batches run them.
    per_step = max(1, 256 // n_prompt)
    for first in range(0, batch, per_step):
        engine.step(
            [(slots[b], prompts[b], True) for b in range(first, min(batch, first + per_step))]
        )
    t1 = time.perf_counter()
    for _ in range(n_gen):
        work = [(s, [engine.sample(s, greedy)], True) for s in slots]
        engine.step(work)
    t2 = time.perf_counter()
    return {
        "batch": batch,
        "pp_ts": batch * n_prompt / (t1 - t0),
        "tg_ts": batch * n_gen / (t2 - t1),
        "tg_ts_per_sequence": n_gen / (t2 - t1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", help="model folder or Hub repo id")
    source.add_argument("--synthetic", help="a synthetic model (trit.synthetic): 2b4t, ...")
    p.add_argument("-b", "--batch", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--kv-cache", default="f16", choices=["f16", "f32"])
    p.add_argument("--json", action="store_true", help="print JSON lines")
    args = p.parse_args()
    if args.n_prompt < 1 or args.n_gen < 1 or not args.batch or min(args.batch) < 1:
        p.error("-p, -n and every -b must be >= 1")
    folder = synthetic.ensure(args.synthetic) if args.synthetic else resolve(args.model)
    model = load_model(folder)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    pp = pp_rate(model, [int(i) for i in rng.integers(0, vocab, 128)], args.threads, args.kv_cache)
    rows = []
    for b in args.batch:
        ids = rng.integers(0, vocab, size=(b, args.n_prompt))
        rows.append(batched(model, b, ids, args.n_gen, args.threads, args.kv_cache))
    if args.json:
        for row in rows:
            print(json.dumps({**row, "pp128_ts": pp}))
        return 0
    print(f"pp128 (one sequence): {pp:.1f} tokens/s")
    print("|   B | pp tokens/s | tg tokens/s (all) | tg tokens/s (each) | tg / pp128 |")
    print("| --: | ----------: | ----------------: | -----------------: | ---------: |")
    for r in rows:
        print(
            f"| {r['batch']:3.0f} | {r['pp_ts']:11.1f} | {r['tg_ts']:17.1f} "
            f"| {r['tg_ts_per_sequence']:18.1f} | {r['tg_ts'] / pp:10.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
