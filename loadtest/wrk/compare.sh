#!/usr/bin/env bash
# flashcore against its peer (axum + Redis, loadtest/baselines/redis_peer.rs)
# and the bare axum hello, under the same wrk load, interleaved.
#
# Starts, each on a free 127.0.0.1 port and in one temp dir:
#   redis-server   --appendonly yes --appendfsync always (no RDB snapshots);
#   redis_peer     over that Redis, SKUs `hot` and `gone` seeded with HSET;
#   flashcore      `serve`, strict durability, empty catalog, the same two
#                  SKUs created through the admin API;
#   axum_hello     the machine's HTTP ceiling (a GET /, workload-independent);
# with one FLASHCORE_JWT_SECRET for both order servers, so the same 1,000
# customer tokens (from `flashcore token`) work on each.
#
# Three workloads (or those in WORKLOADS), each `wrk -t2 -c64 -dSECS
# --latency`, single-line POST /v1/orders on one SKU, the tokens rotating:
#   grants     SKU `hot`, stock 10^9: every answer is a durable 201;
#   soldout    SKU `gone`, stock 0: every answer 409, no Idempotency-Key;
#   soldout+key  the same with a fresh Idempotency-Key per request.
# Each run goes through every workload and, within it, every system (the
# order of the systems rotates between runs). Before the runs one request per
# system and workload checks the status; after each wrk, the count of non-2xx
# answers is checked against the workload. Around each wrk the servers' CPU
# time (user + system, /proc/PID/stat) and context switches (voluntary +
# involuntary, every thread's /proc/PID/task/TID/status) are read, and divided
# by the requests wrk counted; the peer's are its axum front and Redis
# together, also shown apart. Then the medians over RUNS, flashcore/peer and
# flashcore/hello ratios, and the CPU and context switches per request, as
# Markdown tables.
#
# OTHER_PEER=<redis_peer binary> adds a second peer ("other", say the
# previous version) on the same Redis, measured the same way.
#
# Every process is stopped by pid when the script exits, however it exits.
#
# Usage: loadtest/wrk/compare.sh   (loadtest/wrk/cpu.sh: 8 s, grants and sold out)
# Build first: cargo build --release && \
#   cargo build --release -p loadtest --example redis_peer --example axum_hello
# Knobs (environment): RUNS=3 SECS=10 CONNECTIONS=64 THREADS=2 USERS=1000
#   WORKLOADS="grants soldout soldout+key" FLASHCORE=target/release/flashcore
#   PEER=target/release/examples/redis_peer OTHER_PEER= TARGET_DIR=target
#   KEEP=1 (keep the temp dir)
# Needs wrk, redis-server and curl: apt-get install wrk redis-server curl
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
USERS=${USERS:-1000}
KEEP=${KEEP:-0}
read -r -a WORKLOADS <<< "${WORKLOADS:-grants soldout soldout+key}"
OTHER_PEER=${OTHER_PEER:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}}
FLASHCORE=${FLASHCORE:-$TARGET_DIR/release/flashcore}
PEER=${PEER:-$TARGET_DIR/release/examples/redis_peer}
HELLO=$TARGET_DIR/release/examples/axum_hello
# More stock than any run can sell.
BIG_STOCK=1000000000
# A wrk that overruns its duration by this much is stopped.
WRK_SLACK_SECS=30
# The shared secret (at least 32 bytes); fixed, so runs are alike.
export FLASHCORE_JWT_SECRET=${FLASHCORE_JWT_SECRET:-compare-sh-fixed-secret-0123456789abcdef}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

lib_need compare.sh "wrk redis-server curl" wrk redis-server redis-cli curl timeout
for bin in "$FLASHCORE" "$PEER" "$HELLO" ${OTHER_PEER:+"$OTHER_PEER"}; do
  [ -x "$bin" ] || {
    echo "compare.sh: no $bin; run cargo build --release &&" \
      "cargo build --release -p loadtest --example redis_peer --example axum_hello" >&2
    exit 1
  }
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d)
cleanup() {
  lib_stop_all
  if [ "$KEEP" = 1 ]; then echo "compare.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

REDIS_PORT=$(lib_free_port)
PEER_PORT=$(lib_free_port "$REDIS_PORT")
FLASHCORE_PORT=$(lib_free_port "$REDIS_PORT" "$PEER_PORT")
HELLO_PORT=$(lib_free_port "$REDIS_PORT" "$PEER_PORT" "$FLASHCORE_PORT")
OTHER_PORT=$(lib_free_port "$REDIS_PORT" "$PEER_PORT" "$FLASHCORE_PORT" "$HELLO_PORT")
declare -A URL=(
  [flashcore]=http://127.0.0.1:$FLASHCORE_PORT
  [peer]=http://127.0.0.1:$PEER_PORT
  [hello]=http://127.0.0.1:$HELLO_PORT
  [other]=http://127.0.0.1:$OTHER_PORT
)
# The processes whose CPU and context switches count for each system: the
# server itself, then (for a peer) Redis.
declare -A PIDS

echo "compare.sh: starting redis-server, redis_peer, flashcore and axum_hello in $WORK" >&2
mkdir "$WORK/redis"
lib_spawn "$WORK/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
  --dir "$WORK/redis" --appendonly yes --appendfsync always --save '' --daemonize no
REDIS_PID=$LIB_LAST_PID
for _ in $(seq "$LIB_READY_TENTHS"); do
  redis-cli -p "$REDIS_PORT" ping > /dev/null 2>&1 && break
  kill -0 "$REDIS_PID" 2>/dev/null || { cat "$WORK/redis.log" >&2; exit 1; }
  sleep 0.1
done
redis() { timeout 10 redis-cli -p "$REDIS_PORT" "$@" > /dev/null; }
redis HSET sku:hot name hot price_cents 100 available "$BIG_STOCK"
redis HSET sku:gone name gone price_cents 100 available 0

lib_spawn "$WORK/peer.log" "$PEER" --listen "127.0.0.1:$PEER_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/"
lib_wait_http "${URL[peer]}/healthz" "$LIB_LAST_PID" "$WORK/peer.log"
PIDS[peer]="$LIB_LAST_PID $REDIS_PID"
if [ -n "$OTHER_PEER" ]; then
  lib_spawn "$WORK/other.log" "$OTHER_PEER" --listen "127.0.0.1:$OTHER_PORT" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/"
  lib_wait_http "${URL[other]}/healthz" "$LIB_LAST_PID" "$WORK/other.log"
  PIDS[other]="$LIB_LAST_PID $REDIS_PID"
fi

lib_flashcore_start "$FLASHCORE_PORT" "$WORK/flashcore" "$WORK/flashcore.log"
PIDS[flashcore]=$LIB_LAST_PID
lib_flashcore_sku "${URL[flashcore]}" hot "$BIG_STOCK"
lib_flashcore_sku "${URL[flashcore]}" gone 0

lib_spawn "$WORK/hello.log" "$HELLO" "127.0.0.1:$HELLO_PORT"
lib_wait_http "${URL[hello]}/" "$LIB_LAST_PID" "$WORK/hello.log"
PIDS[hello]=$LIB_LAST_PID
ORDER_SYSTEMS=(flashcore peer)
[ -n "$OTHER_PEER" ] && ORDER_SYSTEMS+=(other)
CLK_TCK=$(getconf CLK_TCK)

echo "compare.sh: $USERS tokens" >&2
lib_tokens_lua "$WORK/tokens.lua" "$USERS"
declare -A SKU=([grants]=hot [soldout]=gone [soldout+key]=gone)
declare -A KEYED=([grants]=0 [soldout]=0 [soldout+key]=1)
declare -A STATUS=([grants]=201 [soldout]=409 [soldout+key]=409)
for w in "${WORKLOADS[@]}"; do
  [ -n "${SKU[$w]:-}" ] || { echo "compare.sh: unknown workload $w" >&2; exit 1; }
  lib_orders_lua "$WORK/$w.lua" "$WORK/tokens.lua" "${SKU[$w]}" "${KEYED[$w]}"
done

# One request per order server and workload, as wrk will send it.
token=$(sed -n 2p "$WORK/tokens.lua" | tr -d '",')
for w in "${WORKLOADS[@]}"; do
  for sys in "${ORDER_SYSTEMS[@]}"; do
    key=()
    [ "${KEYED[$w]}" = 1 ] && key=(-H "Idempotency-Key: probe-$sys")
    got=$(curl -s --max-time 10 -o "$WORK/probe.json" -w '%{http_code}' -X POST \
      "${URL[$sys]}/v1/orders" -H 'Content-Type: application/json' \
      -H "Authorization: Bearer $token" "${key[@]}" \
      -d "{\"items\":[{\"sku_id\":\"${SKU[$w]}\",\"qty\":1}]}")
    if [ "$got" != "${STATUS[$w]}" ]; then
      echo "compare.sh: $sys answered $got to a $w probe, not ${STATUS[$w]}:" >&2
      cat "$WORK/probe.json" >&2
      exit 1
    fi
  done
done

# per_request DELTA REQUESTS SCALE: DELTA * SCALE / REQUESTS, 2 decimals.
per_request() {
  awk -v d="$1" -v n="$2" -v s="$3" 'BEGIN { if (n > 0) printf "%.2f", d * s / n; else print "nan" }'
}

# bench RUN WORKLOAD SYSTEM: one wrk; appends a line to results.txt:
# workload system run req/s p99 cpu-us/req ctx/req redis-cpu-us/req redis-ctx/req note
bench() {
  local run=$1 w=$2 sys=$3 script=() line server redis_pid
  [ "$sys" = hello ] || script=(-s "$WORK/$w.lua")
  read -r server redis_pid <<< "${PIDS[$sys]}"
  local cpu0 ctx0 rcpu0=0 rctx0=0 cpu1 ctx1 rcpu1=0 rctx1=0
  cpu0=$(lib_cpu_ticks "$server"); ctx0=$(lib_ctx_switches "$server")
  if [ -n "$redis_pid" ]; then rcpu0=$(lib_cpu_ticks "$redis_pid"); rctx0=$(lib_ctx_switches "$redis_pid"); fi
  line=$(timeout $((SECS + WRK_SLACK_SECS)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SECS}s" \
    --latency "${script[@]}" "${URL[$sys]}/" -- "r$run-$sys" | lib_wrk_parse)
  cpu1=$(lib_cpu_ticks "$server"); ctx1=$(lib_ctx_switches "$server")
  if [ -n "$redis_pid" ]; then rcpu1=$(lib_cpu_ticks "$redis_pid"); rctx1=$(lib_ctx_switches "$redis_pid"); fi
  # rps p50 p99 requests non2xx errors
  read -r rps p50 p99 total non2xx errors <<< "$line"
  local us_tick=$((1000000 / CLK_TCK)) cpu ctx rcpu rctx
  cpu=$(per_request $((cpu1 - cpu0 + rcpu1 - rcpu0)) "$total" "$us_tick")
  ctx=$(per_request $((ctx1 - ctx0 + rctx1 - rctx0)) "$total" 1)
  rcpu=$(per_request $((rcpu1 - rcpu0)) "$total" "$us_tick")
  rctx=$(per_request $((rctx1 - rctx0)) "$total" 1)
  local note=""
  if [ "$sys" != hello ]; then
    if [ "${STATUS[$w]}" = 201 ] && [ "$non2xx" != 0 ]; then note="($non2xx non-2xx!)"; fi
    if [ "${STATUS[$w]}" = 409 ] && [ "$non2xx" != "$total" ]; then
      note="($((total - non2xx)) 2xx!)"
    fi
  fi
  [ "$errors" = 0 ] || note="$note ($errors socket errors)"
  printf '%-12s run %d %-9s %10.0f req/s  p50 %7.2f ms  p99 %7.2f ms  %6.1f us %5.2f cs /req %s\n' \
    "$w" "$run" "$sys" "$rps" "$p50" "$p99" "$cpu" "$ctx" "$note" >&2
  echo "$w $sys $run $rps $p99 $cpu $ctx $rcpu $rctx $note" >> "$WORK/results.txt"
}

SYSTEMS=("${ORDER_SYSTEMS[@]}" hello)
n_sys=${#SYSTEMS[@]}
echo "compare.sh: $RUNS runs x ${#WORKLOADS[@]} workloads x $n_sys systems x ${SECS}s" \
  "(wrk -t$THREADS -c$CONNECTIONS), about $((RUNS * ${#WORKLOADS[@]} * n_sys * (SECS + 1)))s" >&2
: > "$WORK/results.txt"
for run in $(seq "$RUNS"); do
  for w in "${WORKLOADS[@]}"; do
    for i in $(seq 0 $((n_sys - 1))); do
      bench "$run" "$w" "${SYSTEMS[$(((i + run - 1) % n_sys))]}"
    done
  done
done

# median WORKLOAD SYSTEM FIELD (4 = req/s, 5 = p99 ms, 6 = CPU us/request,
# 7 = context switches/request, 8 and 9 = the same for the peer's Redis)
median() {
  awk -v w="$1" -v s="$2" -v f="$3" '$1 == w && $2 == s { print $f }' "$WORK/results.txt" \
    | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

echo
echo "Medians of $RUNS interleaved runs, wrk -t$THREADS -c$CONNECTIONS -d${SECS}s," \
  "$USERS users, single-line POST /v1/orders (hello: GET /); $(nproc) cores;" \
  "load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| workload | flashcore req/s | peer req/s | hello req/s | flashcore/peer | flashcore/hello | flashcore p99 ms | peer p99 ms | hello p99 ms |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for w in "${WORKLOADS[@]}"; do
  f=$(median "$w" flashcore 4); p=$(median "$w" peer 4); h=$(median "$w" hello 4)
  printf '| %s | %.0f | %.0f | %.0f | %s | %s | %.2f | %.2f | %.2f |\n' "$w" "$f" "$p" "$h" \
    "$(ratio "$f" "$p")" "$(ratio "$f" "$h")" \
    "$(median "$w" flashcore 5)" "$(median "$w" peer 5)" "$(median "$w" hello 5)"
done
if [ -n "$OTHER_PEER" ]; then
  echo
  echo "| workload | other peer req/s | peer / other |"
  echo "| --- | ---: | ---: |"
  for w in "${WORKLOADS[@]}"; do
    o=$(median "$w" other 4)
    printf '| %s | %.0f | %s |\n' "$w" "$o" "$(ratio "$(median "$w" peer 4)" "$o")"
  done
fi
echo
echo "Per request, same runs (CPU: user + system time of the server processes over the" \
  "wrk run / requests; context switches: voluntary + involuntary, all threads):"
echo
header="| workload |"
rule="| --- |"
for sys in "${SYSTEMS[@]}"; do
  header="$header $sys CPU us |"; rule="$rule ---: |"
done
for sys in "${SYSTEMS[@]}"; do
  header="$header $sys ctx switches |"; rule="$rule ---: |"
done
echo "$header"
echo "$rule"
# cell WORKLOAD SYSTEM FIELD: the median, with the peer's front + Redis split.
cell() {
  local all redis
  all=$(median "$1" "$2" "$3")
  case $2 in
    peer | other)
      redis=$(median "$1" "$2" $(($3 + 2)))
      awk -v a="$all" -v r="$redis" 'BEGIN { printf "%.2f (%.2f + %.2f)", a, a - r, r }' ;;
    *) awk -v a="$all" 'BEGIN { printf "%.2f", a }' ;;
  esac
}
for w in "${WORKLOADS[@]}"; do
  row="| $w |"
  for sys in "${SYSTEMS[@]}"; do row="$row $(cell "$w" "$sys" 6) |"; done
  for sys in "${SYSTEMS[@]}"; do row="$row $(cell "$w" "$sys" 7) |"; done
  echo "$row"
done
echo
echo "A peer's figure is its axum front and Redis together, then (front + Redis)," \
  "the front being the total less Redis's median."
if grep -q '!' "$WORK/results.txt"; then
  echo
  echo "Warning: some runs got answers their workload should not have:"
  grep '!' "$WORK/results.txt"
fi
