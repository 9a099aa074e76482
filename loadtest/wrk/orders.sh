#!/usr/bin/env bash
# Single-line orders on one hot SKU from many users, driven by wrk (a C load
# generator that leaves more of the machine to the server than loadtest does).
#
# Starts `flashcore serve` (strict durability) on 127.0.0.1 with a temp data
# dir and an empty catalog, creates the SKU `bulk` with STOCK units and no
# per-user limit, writes a wrk script that rotates over USERS customer tokens,
# runs `wrk -t1 -c CONNECTIONS -d SECS --latency`, and stops the server by pid
# (SIGTERM) however the script exits. Requests carry no Idempotency-Key.
# The pieces are shared with compare.sh through lib.sh.
#
# Usage: loadtest/wrk/orders.sh
# Knobs (environment): STOCK=1000000000 (0: every answer is a sold-out 409)
#   SECS=10 CONNECTIONS=64 USERS=256 PORT=18181 RUNS=1
#   FLASHCORE=target/release/flashcore (build it first: cargo build --release)
# Needs wrk and curl (apt-get install wrk curl).
set -euo pipefail

STOCK=${STOCK:-1000000000}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-64}
USERS=${USERS:-256}
PORT=${PORT:-18181}
RUNS=${RUNS:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FLASHCORE=${FLASHCORE:-$ROOT/target/release/flashcore}
URL=http://127.0.0.1:$PORT
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

lib_need orders.sh "wrk curl" wrk curl
[ -x "$FLASHCORE" ] || { echo "orders.sh: no $FLASHCORE; run cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'lib_stop_all; rm -rf "$WORK"' EXIT

export FLASHCORE_JWT_SECRET
FLASHCORE_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

one_run() {
  rm -rf "$WORK/data"
  lib_flashcore_start "$PORT" "$WORK/data" "$WORK/server.log"
  local server=$LIB_LAST_PID
  lib_flashcore_sku "$URL" bulk "$STOCK"
  lib_tokens_lua "$WORK/tokens.lua" "$USERS"
  lib_orders_lua "$WORK/orders.lua" "$WORK/tokens.lua" bulk 0
  wrk -t1 -c"$CONNECTIONS" -d"${SECS}s" --latency -s "$WORK/orders.lua" "$URL" \
    | grep -E "Requests/sec|^ +(50|99)%|Non-2xx"
  lib_stop "$server" || { echo "orders.sh: the server did not exit 0" >&2; exit 1; }
}

for run in $(seq "$RUNS"); do
  echo "run $run: stock $STOCK, $CONNECTIONS connections, $USERS users, ${SECS}s"
  one_run
done
