#!/usr/bin/env bash
# The machine's HTTP ceiling: wrk against a bare axum "hello"
# (loadtest/examples/axum_hello.rs), with the same shape as orders.sh:
# one wrk thread, CONNECTIONS connections, SECS seconds, RUNS runs.
#
# Usage: loadtest/wrk/hello.sh   (builds the example first)
# Knobs (environment): SECS=10 CONNECTIONS=64 PORT=18090 RUNS=1
# Needs wrk (apt-get install wrk).
set -euo pipefail

SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-18090}
RUNS=${RUNS:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
command -v wrk >/dev/null || { echo "hello.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }

cargo build --release -q -p loadtest --example axum_hello --manifest-path "$ROOT/Cargo.toml"
"${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/axum_hello" "127.0.0.1:$PORT" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
sleep 1
for run in $(seq "$RUNS"); do
  echo "run $run: $CONNECTIONS connections, ${SECS}s"
  wrk -t1 -c"$CONNECTIONS" -d"${SECS}s" --latency "http://127.0.0.1:$PORT/" \
    | grep -E "Requests/sec|^ +(50|99)%"
done
