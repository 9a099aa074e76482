#!/usr/bin/env bash
# Single-line orders on one hot SKU from many users, driven by wrk (a C load
# generator that leaves more of the machine to the server than loadtest does).
#
# Starts `flashcore serve` (strict durability) on 127.0.0.1 with a temp data
# dir and an empty catalog, creates the SKU `bulk` with STOCK units and no
# per-user limit, writes a wrk script that rotates over USERS customer tokens,
# runs `wrk -t1 -c CONNECTIONS -d SECS --latency`, and stops the server by pid
# (SIGTERM) however the script exits. Requests carry no Idempotency-Key.
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
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FLASHCORE=${FLASHCORE:-$ROOT/target/release/flashcore}
URL=http://127.0.0.1:$PORT

for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "orders.sh: needs $tool (apt-get install $tool)" >&2; exit 1; }
done
[ -x "$FLASHCORE" ] || { echo "orders.sh: no $FLASHCORE; run cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

export FLASHCORE_JWT_SECRET
FLASHCORE_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo '{"skus":[],"promotions":[]}' > "$WORK/catalog.json"

one_run() {
  rm -rf "$WORK/data"
  "$FLASHCORE" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --catalog "$WORK/catalog.json" --durability strict > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf "$URL/readyz" > /dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.1
  done
  local admin
  admin=$("$FLASHCORE" token --user ops --admin --ttl 1h)
  curl -sf -X POST "$URL/v1/skus" -H "Authorization: Bearer $admin" \
    -H 'Content-Type: application/json' \
    -d "{\"sku_id\":\"bulk\",\"name\":\"Bulk\",\"price_cents\":100,\"stock\":$STOCK,\"per_user_limit\":null}" > /dev/null
  {
    echo 'local tokens = {'
    for i in $(seq "$USERS"); do echo "\"$("$FLASHCORE" token --user "buyer-$i" --ttl 1h)\","; done
    echo '}'
    cat <<'LUA'
local n = 0
local body = '{"items":[{"sku_id":"bulk","qty":1}]}'
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json",
                   ["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]}
  return wrk.format("POST", "/v1/orders", headers, body)
end
LUA
  } > "$WORK/orders.lua"
  wrk -t1 -c"$CONNECTIONS" -d"${SECS}s" --latency -s "$WORK/orders.lua" "$URL" \
    | grep -E "Requests/sec|^ +(50|99)%|Non-2xx"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || { echo "orders.sh: the server did not exit 0" >&2; exit 1; }
  SERVER_PID=""
}

for run in $(seq "$RUNS"); do
  echo "run $run: stock $STOCK, $CONNECTIONS connections, $USERS users, ${SECS}s"
  one_run
done
