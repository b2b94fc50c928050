#!/usr/bin/env bash
# Speed of every supported family at its published shape, as a markdown table for
# the README ("Supported models"): `trit bench --synthetic NAME` on random weights
# written (once, to ~/.cache/trit/synthetic or $TRIT_CACHE) in that family's layout.
#
#   benches/families.sh                     # every shape
#   benches/families.sh falcon3-1b bitnet-large
#
# Run it on a quiet machine: each shape takes minutes and the larger ones need
# their checkpoint's size free on disk (falcon3-10b about 4 GiB, bitnet-3b about
# 7 GiB of float16 masters) and in memory. The raw JSON of each run is kept in
# $RESULTS (default: a new temporary folder, printed at the end).
set -euo pipefail

TRIT=${TRIT:-trit}
PYTHON=${PYTHON:-python3}
ARGS=(-p 64 -n 32 -t 1,2 -r 2 --json)
if (($# == 0)); then
    set -- falcon3-1b falcon3-3b falcon3-7b falcon3-10b falcon-e-1b falcon-e-3b \
        bitnet-large bitnet-3b llama3-8b 2b4t
fi
RESULTS=${RESULTS:-$(mktemp -d)}
mkdir -p "$RESULTS"

for name in "$@"; do
    echo "[$name] trit bench --synthetic $name ${ARGS[*]}" >&2
    "$TRIT" bench --synthetic "$name" "${ARGS[@]}" >"$RESULTS/$name.json"
done

"$PYTHON" - "$RESULTS" "$@" <<'EOF'
import json
import sys
from pathlib import Path

results, names = Path(sys.argv[1]), sys.argv[2:]
print("| model | pp64 1t | pp64 2t | tg32 1t | tg32 2t | weights MiB | peak RSS MiB |")
print("|---|---|---|---|---|---|---|")
for name in names:
    runs = json.loads((results / f"{name}.json").read_text())
    speed = {}
    for r in runs:
        test = "pp" if r["n_prompt"] else "tg"
        speed[test, r["n_threads"]] = f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"
    cells = [speed.get((test, t), "-") for test in ("pp", "tg") for t in (1, 2)]
    size = runs[0]["model_size"] / 2**20
    rss = max(r["peak_rss_bytes"] for r in runs) / 2**20
    print(f"| {name} | {' | '.join(cells)} | {size:.0f} | {rss:.0f} |")
print(f"\nJSON of each run: {results}", file=sys.stderr)
EOF
