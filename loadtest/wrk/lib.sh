# shellcheck shell=bash
# What the wrk scripts share (sourced by orders.sh and compare.sh, never run):
# tool checks, child processes started and stopped by pid with a bounded
# wait, flashcore started on a temp data dir, its SKUs created through the
# admin API, and the wrk Lua that rotates customer tokens over POST /v1/orders.
#
# Everything here listens on 127.0.0.1 only. The caller sets FLASHCORE (the
# binary) and FLASHCORE_JWT_SECRET (exported), and calls lib_stop_all from
# its EXIT trap.

# Seconds a child gets to exit after SIGTERM before it is killed.
LIB_STOP_GRACE_SECS=${LIB_STOP_GRACE_SECS:-20}
# Tenths of a second a server gets to answer its first request.
LIB_READY_TENTHS=${LIB_READY_TENTHS:-200}
# Children started with lib_spawn, stopped by lib_stop_all.
LIB_PIDS=()
LIB_LAST_PID=""

# lib_need NAME PACKAGES TOOL...: exits, naming the apt-get packages, when a
# tool is missing.
lib_need() {
  local name=$1 packages=$2 tool missing=()
  shift 2
  for tool in "$@"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "$name: needs ${missing[*]}: apt-get install $packages" >&2
    exit 1
  fi
}

# lib_free_port [TAKEN...]: a port on 127.0.0.1 nobody answers on, not TAKEN.
lib_free_port() {
  local port taken
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 40000))
    for taken in "$@"; do [ "$port" = "$taken" ] && continue 2; done
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "lib.sh: no free port found" >&2
  return 1
}

# lib_spawn LOG CMD ARG...: starts CMD in the background, output to LOG;
# its pid is LIB_LAST_PID and is remembered for lib_stop_all.
lib_spawn() {
  local log=$1
  shift
  "$@" > "$log" 2>&1 &
  LIB_LAST_PID=$!
  LIB_PIDS+=("$LIB_LAST_PID")
}

# lib_stop PID: SIGTERM, up to LIB_STOP_GRACE_SECS for it to exit, then
# SIGKILL. Returns the child's exit status (0 if it was already reaped).
# The pid is forgotten first, so lib_stop_all never signals a reused pid.
lib_stop() {
  local pid=$1 status=0 kept=() p
  for p in "${LIB_PIDS[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
  LIB_PIDS=("${kept[@]}")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((LIB_STOP_GRACE_SECS * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "lib.sh: pid $pid did not exit within ${LIB_STOP_GRACE_SECS}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || status=$?
  # 127: not our child any more (already reaped).
  [ "$status" = 127 ] && status=0
  return "$status"
}

# lib_stop_all: stops every child lib_spawn started, last first.
lib_stop_all() {
  while [ "${#LIB_PIDS[@]}" -gt 0 ]; do
    lib_stop "${LIB_PIDS[-1]}" || true
  done
}

# lib_wait_http URL PID LOG: waits until URL answers 2xx; fails, showing
# LOG, if PID dies or LIB_READY_TENTHS pass first.
lib_wait_http() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq "$LIB_READY_TENTHS"); do
    curl -sf -o /dev/null --max-time 1 "$url" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "lib.sh: the server behind $url died:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "lib.sh: $url did not answer in time:" >&2
  cat "$log" >&2
  return 1
}

# lib_flashcore_start PORT DATA_DIR LOG: `flashcore serve` (strict) on an
# empty catalog; waits for /readyz. Its pid is LIB_LAST_PID.
lib_flashcore_start() {
  local port=$1 data=$2 log=$3
  echo '{"skus":[],"promotions":[]}' > "$data.catalog.json"
  lib_spawn "$log" "$FLASHCORE" serve --listen "127.0.0.1:$port" --data-dir "$data" \
    --catalog "$data.catalog.json" --durability strict
  lib_wait_http "http://127.0.0.1:$port/readyz" "$LIB_LAST_PID" "$log"
}

# lib_flashcore_sku URL SKU_ID STOCK: creates a SKU at 100 cents with no
# per-user limit, through the admin API.
lib_flashcore_sku() {
  local url=$1 sku=$2 stock=$3 admin
  admin=$("$FLASHCORE" token --user ops --admin --ttl 2h)
  curl -sf --max-time 10 -o /dev/null -X POST "$url/v1/skus" \
    -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
    -d "{\"sku_id\":\"$sku\",\"name\":\"$sku\",\"price_cents\":100,\"stock\":$stock,\"per_user_limit\":null}"
}

# lib_tokens_lua FILE USERS: a Lua table `tokens` of USERS customer tokens
# (buyer-1 .. buyer-USERS, valid 2 hours).
lib_tokens_lua() {
  local file=$1 users=$2 i
  {
    echo 'local tokens = {'
    for i in $(seq "$users"); do
      echo "\"$("$FLASHCORE" token --user "buyer-$i" --ttl 2h)\","
    done
    echo '}'
  } > "$file"
}

# lib_orders_lua FILE TOKENS_LUA SKU_ID KEYED: a wrk script sending single-line
# POST /v1/orders for SKU_ID, rotating over the tokens. KEYED=1 adds a fresh
# Idempotency-Key per request: `<wrk arg 1>-<thread>-<count>` (pass a
# different first argument after `--` on each run to keep keys fresh).
lib_orders_lua() {
  local file=$1 tokens=$2 sku=$3 keyed=$4
  {
    cat "$tokens"
    cat <<LUA
local keyed = $([ "$keyed" = 1 ] && echo true || echo false)
local body = '{"items":[{"sku_id":"$sku","qty":1}]}'
LUA
    cat <<'LUA'
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end
local prefix = "k"
function init(args)
  if args[1] then prefix = args[1] end
end
local n = 0
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json",
                   ["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]}
  if keyed then
    headers["Idempotency-Key"] = prefix .. "-" .. tostring(thread_no) .. "-" .. n
  end
  return wrk.format("POST", "/v1/orders", headers, body)
end
LUA
  } > "$file"
}

# lib_wrk_parse: reads wrk --latency output on stdin and prints one line:
# "<req/s> <p50 ms> <p99 ms> <requests> <non-2xx> <socket errors>".
lib_wrk_parse() {
  awk '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
      if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
      return v + 0
    }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    / requests in / { total = $1 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { errors = ($4 + 0) + ($6 + 0) + ($8 + 0) + ($10 + 0) }
    /^Requests\/sec:/ { rps = $2 }
    END { printf "%s %.3f %.3f %d %d %d\n", rps, p50, p99, total, non2xx, errors }
  '
}

# lib_cpu_ticks PID...: user + system CPU of the processes, in clock ticks
# (getconf CLK_TCK a second), summed over all their threads, gone ones too
# (/proc/PID/stat fields 14 and 15).
lib_cpu_ticks() {
  local pid fields total=0
  for pid in "$@"; do
    # Fields after "pid (comm) " start at field 3, the state.
    read -r -a fields < <(sed 's/^.*) //' "/proc/$pid/stat")
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

# lib_ctx_switches PID...: voluntary + involuntary context switches of the
# processes, summed over their live threads (a thread that exits takes its
# count with it; the servers here keep theirs).
lib_ctx_switches() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/task/"*/status 2>/dev/null; done \
    | awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}
