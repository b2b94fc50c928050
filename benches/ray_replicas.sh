#!/usr/bin/env bash
# Throughput of 1 and then 2 replicas behind one endpoint: `trit serve --ray` on a
# local Ray cluster (each replica 1 thread and 1 CPU), loaded by `trit bench --server`
# (streaming clients on loopback). Prints one table per replica count.
#
#   benches/ray_replicas.sh                      # the bundled model
#   MODEL=microsoft/bitnet-b1.58-2B-4T CLIENTS=8 REQUESTS=64 N=64 benches/ray_replicas.sh
#
# Each run starts its own local cluster (needs trit[ray]); the machine should be quiet.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-8}
REQUESTS=${REQUESTS:-64}
N=${N:-64}
PARALLEL=${PARALLEL:-4}
REPLICAS=${REPLICAS:-1 2}
PORT=${PORT:-8765}
model=()
[ -n "${MODEL:-}" ] && model=(-m "$MODEL")
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for replicas in $REPLICAS; do
    printf '\n== %s replica(s), 1 thread each, --parallel %s\n' "$replicas" "$PARALLEL"
    trit serve --ray "${model[@]}" --replicas "$replicas" -t 1 --parallel "$PARALLEL" \
        --port "$PORT" --max-concurrency "$CLIENTS" 2>"$log" &
    server=$!
    # "serving on" comes once every replica has loaded the model.
    until grep -q "serving on" "$log"; do
        kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.5
    done
    trit bench --server "http://127.0.0.1:$PORT" --clients "$CLIENTS" --requests "$REQUESTS" -n "$N"
    kill -TERM "$server"  # a background job of a script ignores SIGINT
    wait "$server"
done
