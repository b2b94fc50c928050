#!/usr/bin/env bash
# The queued server (--parallel 1) against continuous batching (--parallel 8 by
# default) on one workload: `trit serve` on the synthetic 2B4T weights (with the
# bundled tokenizer padded to the model's vocabulary, so that every token
# decodes to text and time to first token is measurable), loaded by
# `trit bench --server` (streaming clients on loopback). One table per mode.
#
#   benches/serve_parallel.sh
#   THREADS=2 CLIENTS=8 REQUESTS=16 N=32 MODES="1 8" benches/serve_parallel.sh
#   SERVE_ARGS="--kv-cache f16" benches/serve_parallel.sh   # more `trit serve` flags
#
# The machine should be quiet; the synthetic checkpoint is written once (~1 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-8}
REQUESTS=${REQUESTS:-16}
N=${N:-32}
MODES=${MODES:-1 8}
PORT=${PORT:-8766}
read -r -a serve_args <<<"${SERVE_ARGS:-}"
folder=$(mktemp -d)
log=$(mktemp)
server=
cleanup() {
    [ -n "$server" ] && kill -TERM "$server" 2>/dev/null && wait "$server" || true
    rm -rf "$folder" "$log"
}
trap cleanup EXIT
python benches/synthetic_serving_folder.py "$folder" >/dev/null

for parallel in $MODES; do
    printf '\n== --parallel %s, %s thread(s)\n' "$parallel" "$THREADS"
    trit serve -m "$folder" -t "$THREADS" --parallel "$parallel" --port "$PORT" "${serve_args[@]}" \
        --max-concurrency "$CLIENTS" --log-level warning >"$log" 2>&1 &
    server=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.5
    done
    trit bench --server "http://127.0.0.1:$PORT" --clients "$CLIENTS" --requests "$REQUESTS" -n "$N"
    kill -TERM "$server"
    wait "$server" || true
    server=
done
