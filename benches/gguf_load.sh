#!/usr/bin/env bash
# Load time and speed of one model read from safetensors and from GGUF, as a markdown
# table for the README ("GGUF"): `trit convert` writes the model as each GGUF type (or
# the GGUF files given are used as they are), then `trit bench` loads each source in a
# fresh process and measures load seconds, prompt and generation tokens/s. The model is
# the same after load whatever the source (tests/test_gguf*.py check the logits), so the
# speed columns should agree and the load column is the difference.
#
#   benches/gguf_load.sh                                  # the bundled model
#   benches/gguf_load.sh tiiuae/Falcon3-1B-Instruct-1.58bit
#   benches/gguf_load.sh MODEL path/to/ggml-model-i2_s.gguf    # also a published GGUF
#
# TYPES (default "i2_s tq2_0 tq1_0") are the GGUF types to write; a type the model cannot
# hold exactly (TQ with rows not whole 256-blocks or a non-f16 scale) is skipped with
# trit convert's message. Run it on a quiet machine; the files go to $RESULTS (default: a
# new temporary folder, printed at the end) and need the model's size free per type.
set -euo pipefail

TRIT=${TRIT:-trit}
PYTHON=${PYTHON:-python3}
TYPES=${TYPES:-i2_s tq2_0 tq1_0}
ARGS=(-p "${PROMPT:-64}" -n "${GEN:-32}" -t "${THREADS:-1}" -r "${REPS:-3}" --json)
RESULTS=${RESULTS:-$(mktemp -d)}
mkdir -p "$RESULTS"

model_args=()
if (($# > 0)); then
    model_args=(-m "$1")
    shift
fi

sources=("${model_args[1]:-bundled}")
for type in $TYPES; do
    out="$RESULTS/model-$type.gguf"
    if "$TRIT" convert "${model_args[@]}" -o "$out" --type "$type" 2>"$RESULTS/convert-$type.log"; then
        sources+=("$out")
    else
        echo "[$type] skipped: $(tail -n 1 "$RESULTS/convert-$type.log")" >&2
    fi
done
sources+=("$@")

i=0
for source in "${sources[@]}"; do
    echo "[$source] trit bench ${ARGS[*]}" >&2
    if [[ $source == bundled ]]; then
        "$TRIT" bench "${ARGS[@]}" >"$RESULTS/$i.json"
    else
        "$TRIT" bench -m "$source" "${ARGS[@]}" >"$RESULTS/$i.json"
    fi
    echo "$source" >"$RESULTS/$i.source"
    i=$((i + 1))
done

"$PYTHON" - "$RESULTS" "$i" <<'EOF'
import json
import sys
from pathlib import Path

results, count = Path(sys.argv[1]), int(sys.argv[2])
print("| source | load s | pp t/s | tg t/s | weights MiB |")
print("|---|---|---|---|---|")
for i in range(count):
    source = (results / f"{i}.source").read_text().strip()
    runs = json.loads((results / f"{i}.json").read_text())
    speed = {"pp" if r["n_prompt"] else "tg": f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}" for r in runs}
    load = min(r["load_s"] for r in runs)
    size = runs[0]["model_size"] / 2**20
    name = Path(source).name if source != "bundled" else "bundled (safetensors)"
    print(f"| {name} | {load:.3f} | {speed.get('pp', '-')} | {speed.get('tg', '-')} | {size:.1f} |")
print(f"\nfiles and JSON of each run: {results}", file=sys.stderr)
EOF
