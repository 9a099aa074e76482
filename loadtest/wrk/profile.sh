#!/usr/bin/env bash
# Profiles flashcore under one of compare.sh's workloads: starts it (strict,
# empty catalog, SKUs `hot` and `gone`), drives it with wrk while
# `perf record` samples the server, then prints where the time went by
# shared object and symbol, and a rough split by component.
#
# Usage: loadtest/wrk/profile.sh [grants|soldout|soldout+key]
# Knobs (environment): SECS=10 CONNECTIONS=64 THREADS=2 USERS=1000 FREQ=999
#   OUT=target/profile (perf.data and the report are kept there)
#   FLASHCORE=target/release/flashcore
# Needs wrk, perf and curl: apt-get install wrk linux-perf curl
# A flame graph from the kept data, with inferno (cargo install inferno):
#   perf script -i target/profile/perf.data | inferno-collapse-perf | inferno-flamegraph > flame.svg
set -euo pipefail

WORKLOAD=${1:-soldout}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
USERS=${USERS:-1000}
FREQ=${FREQ:-999}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$ROOT/target/profile}
FLASHCORE=${FLASHCORE:-$ROOT/target/release/flashcore}
export FLASHCORE_JWT_SECRET=${FLASHCORE_JWT_SECRET:-profile-sh-fixed-secret-0123456789abcdef}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

lib_need profile.sh "wrk linux-perf curl" wrk perf curl timeout
[ -x "$FLASHCORE" ] || { echo "profile.sh: no $FLASHCORE; run cargo build --release" >&2; exit 1; }
case "$WORKLOAD" in
  grants) sku=hot keyed=0 ;;
  soldout) sku=gone keyed=0 ;;
  soldout+key) sku=gone keyed=1 ;;
  *) echo "profile.sh: unknown workload $WORKLOAD (grants, soldout, soldout+key)" >&2; exit 1 ;;
esac

mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'lib_stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

PORT=$(lib_free_port)
lib_flashcore_start "$PORT" "$WORK/flashcore" "$OUT/server.log"
SERVER_PID=$LIB_LAST_PID
lib_flashcore_sku "http://127.0.0.1:$PORT" hot 1000000000
lib_flashcore_sku "http://127.0.0.1:$PORT" gone 0
lib_tokens_lua "$WORK/tokens.lua" "$USERS"
lib_orders_lua "$WORK/load.lua" "$WORK/tokens.lua" "$sku" "$keyed"

echo "profile.sh: $WORKLOAD, wrk -t$THREADS -c$CONNECTIONS -d${SECS}s, perf at ${FREQ} Hz" >&2
# Sample the middle of the run: a second after wrk starts, for SECS - 2.
timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SECS}s" --latency \
  -s "$WORK/load.lua" "http://127.0.0.1:$PORT/" > "$OUT/wrk.txt" &
WRK_PID=$!
sleep 1
perf record -q -F "$FREQ" -g -p "$SERVER_PID" -o "$OUT/perf.data" -- sleep $((SECS - 2)) \
  2> "$OUT/perf-record.log"
wait "$WRK_PID"
grep -E "Requests/sec|99%" "$OUT/wrk.txt" >&2

perf report -i "$OUT/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' > "$OUT/report.txt"
echo
echo "Top symbols (self time; all in $OUT/report.txt):"
head -40 "$OUT/report.txt" | sed 's/  */ /g' | cut -c1-150
echo
echo "By component:"
awk '{ p = $1; sub(/%/, "", p); s = $0; c = "other"
  if (s ~ /kernel/) c = "kernel"
  else if (s ~ /hyper|httparse/) c = "hyper"
  else if (s ~ /axum|tower|matched_path|http::/) c = "axum, tower, http"
  else if (s ~ /tokio|mio/) c = "tokio"
  else if (s ~ /malloc|free|_int_|realloc|consolidate|rdl_alloc|rust_alloc|rust_dealloc/) c = "malloc"
  else if (s ~ /memmove|memcpy|memcmp|memset/) c = "mem*"
  else if (s ~ /serde|json/) c = "serde"
  else if (s ~ /sled|bincode|crc32/) c = "journal"
  else if (s ~ /flashcore::/) c = "flashcore"
  else if (s ~ /actix/) c = "actix"
  t[c] += p }
  END { for (c in t) printf "%6.2f%%  %s\n", t[c], c }' "$OUT/report.txt" | sort -rn
