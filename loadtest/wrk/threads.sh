#!/usr/bin/env bash
# Where a durable grant's context switches and CPU go, thread by thread.
#
# For each flashcore binary given, RUNS times interleaved: starts `serve`
# (strict, empty catalog, one SKU with 10^9 units), runs
# `wrk -t2 -c64 -d${SECS}s` of single-line grants with 1,000 rotating customer
# tokens, and reads every thread's voluntary and involuntary context
# switches (/proc/PID/task/*/status) and CPU ticks (/proc/PID/task/*/stat)
# before and after. Threads are grouped by name with trailing digits removed
# (the seven `sled-io-N` threads are one line); each figure is per request
# wrk counted. Prints one table per binary: the median of the runs per
# group, and the totals.
#
# Usage: loadtest/wrk/threads.sh BIN [BIN...]
# Knobs: RUNS (3), SECS (8). Needs wrk and curl.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNS=${RUNS:-3}
SECS=${SECS:-8}
USERS=1000
export FLASHCORE_JWT_SECRET=${FLASHCORE_JWT_SECRET:-threads-sh-fixed-secret-0123456789abcdef}
[ "$#" -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
lib_need threads.sh "wrk curl" wrk curl timeout
for bin in "$@"; do [ -x "$bin" ] || { echo "threads.sh: no $bin" >&2; exit 1; }; done

WORK=$(mktemp -d)
cleanup() { lib_stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

FLASHCORE=$1
lib_tokens_lua "$WORK/tokens.lua" "$USERS"
lib_orders_lua "$WORK/grants.lua" "$WORK/tokens.lua" hot 0

# per_thread PID: "tid group voluntary involuntary ticks" per thread.
per_thread() {
  local task name
  for task in "/proc/$1/task/"*; do
    name=$(sed 's/[-0-9]*$//' "$task/comm" 2>/dev/null) || continue
    [ "${task##*/}" != "$1" ] || name=main
    awk -v id="${task##*/}" -v n="$name" -v t="$(awk '{ print $14 + $15 }' "$task/stat")" \
      '/^voluntary_ctxt/ { v = $2 } /^nonvoluntary_ctxt/ { i = $2 }
       END { print id, n, v, i, t }' "$task/status"
  done
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))
for run in $(seq "$RUNS"); do
  index=0
  for bin in "$@"; do
    index=$((index + 1))
    FLASHCORE=$bin
    port=$(lib_free_port)
    rm -rf "$WORK/data"
    lib_flashcore_start "$port" "$WORK/data" "$WORK/server.log"
    pid=$LIB_LAST_PID
    lib_flashcore_sku "http://127.0.0.1:$port" hot 1000000000
    per_thread "$pid" > "$WORK/before"
    out=$(timeout $((SECS + 30)) wrk -t2 -c64 -d"${SECS}s" -s "$WORK/grants.lua" \
      "http://127.0.0.1:$port/v1/orders" 2>&1)
    per_thread "$pid" > "$WORK/after"
    lib_stop "$pid"
    requests=$(awk '/requests in/ { print $1 }' <<< "$out")
    rate=$(awk '/Requests\/sec/ { print $2 }' <<< "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' <<< "$out")
    [ -z "$non2xx" ] || { echo "threads.sh: $bin answered $non2xx non-2xx" >&2; exit 1; }
    # Threads are matched by id; one started during the run counts from 0
    # (one that ended took its counts with it).
    awk -v r="$requests" -v us="$TICK_US" -v b="$index" -v run="$run" -v rate="$rate" '
      FNR == NR { v0[$1] = $3; i0[$1] = $4; c0[$1] = $5; next }
      { v[$2] += $3 - v0[$1]; i[$2] += $4 - i0[$1]; c[$2] += ($5 - c0[$1]) * us }
      END {
        for (g in v) { printf "%d %d %s %.3f %.3f %.1f\n", b, run, g, v[g] / r, i[g] / r, c[g] / r
                       tv += v[g]; ti += i[g]; tc += c[g] }
        printf "%d %d TOTAL %.3f %.3f %.1f\n", b, run, tv / r, ti / r, tc / r
        printf "%d %d req/s %s 0 0\n", b, run, rate
      }' "$WORK/before" "$WORK/after" >> "$WORK/results"
    echo "threads.sh: run $run, $bin: $rate req/s" >&2
  done
done

index=0
for bin in "$@"; do
  index=$((index + 1))
  echo
  echo "$bin (medians of $RUNS runs; per request):" \
    "$(awk -v b="$index" '$1 == b && $3 == "req/s" { print $4 }' "$WORK/results" | sort -n \
      | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }') req/s"
  printf '%-18s %10s %12s %10s\n' thread voluntary involuntary "CPU us"
  awk -v b="$index" '$1 == b && $3 != "req/s" { print $3 }' "$WORK/results" | sort -u | while read -r group; do
    awk -v b="$index" -v g="$group" '$1 == b && $3 == g { print $4, $5, $6 }' "$WORK/results" \
      | awk -v g="$group" '{ v[NR] = $1; i[NR] = $2; c[NR] = $3 }
        function med(a, n,   j, k, t) { for (j = 1; j <= n; j++) for (k = j + 1; k <= n; k++)
          if (a[k] < a[j]) { t = a[j]; a[j] = a[k]; a[k] = t } return a[int((n + 1) / 2)] }
        END { printf "%-18s %10s %12s %10s\n", g, med(v, NR), med(i, NR), med(c, NR) }'
  done | sort -k4 -nr
done
