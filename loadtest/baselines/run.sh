#!/usr/bin/env bash
# The same flash sale, side by side: Redis, PostgreSQL, then flashcore (strict).
#
# Each system gets the same work: N clients race to take one unit of a hot SKU
# and record the buyer, durably, before answering:
#
#   redis       a Lua script (decrement-if-available + HINCRBY of the buyer),
#               AOF with appendfsync always, driven by redis-benchmark (EVALSHA);
#   postgresql  UPDATE stock ... WHERE available >= 1 RETURNING, plus an order
#               INSERT, in one transaction with synchronous_commit = on and
#               fsync = on, driven by pgbench;
#   flashcore   `loadtest flash-sale --spawn` (durability strict), which also
#               checks flashcore's books through its API.
#
# Two workloads, each about PHASE_SECS seconds per system:
#   sale    STOCK units for BUYERS buyers, then everyone keeps hammering the
#           sold-out SKU (what a flash sale looks like: mostly refusals);
#   grants  stock that never runs out, so every request is a durable write.
#
# Everything listens on 127.0.0.1 only, lives in one temp dir on the same
# filesystem (flashcore's data dir too, through TMPDIR), and is stopped by
# process id when the script exits, however it exits.
#
# Usage: loadtest/baselines/run.sh
# Knobs (environment): CLIENTS=64 PHASE_SECS=15 STOCK=2000 BUYERS=20000
#   WORKLOADS="sale grants" RUNS=1 (RUNS=3 reports medians) KEEP=1 (keep the temp dir)
# Needs root (or the packages already installed) for apt-get install of
# redis-server, postgresql and jq; runs PostgreSQL as the `postgres` user.
set -euo pipefail

CLIENTS=${CLIENTS:-64}
PHASE_SECS=${PHASE_SECS:-15}
STOCK=${STOCK:-2000}
BUYERS=${BUYERS:-20000}
WORKLOADS=${WORKLOADS:-"sale grants"}
RUNS=${RUNS:-1}
KEEP=${KEEP:-0}
# "grants": more stock than any phase can sell.
BIG_STOCK=1000000000
# flashcore's per-user limit is at most 10000; with 20000 buyers that is never
# reached within a phase, so every grants request is a grant there too.
BIG_PER_USER_LIMIT=10000
# Pilot size used to size redis-benchmark's fixed request count to PHASE_SECS.
REDIS_PILOT_REQUESTS=20000
STOP_GRACE_SECS=20

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SUMMARY_DIR=$TARGET_DIR/baselines

log() { printf '[baselines] %s\n' "$*" >&2; }
die() { printf '[baselines] error: %s\n' "$*" >&2; exit 1; }

# --- cleanup: everything we started, by pid -----------------------------------
PIDS_TERM=()   # stopped with SIGTERM
PIDS_INT=()    # stopped with SIGINT (PostgreSQL's fast shutdown)
POLICY_ADDED=0
WORK=""

stop_pid() { # stop_pid SIGNAL PID
    local sig=$1 pid=$2 waited=0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= STOP_GRACE_SECS * 10)); then
            log "pid $pid did not stop after SIG$sig; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

cleanup() {
    local pid
    for pid in "${PIDS_TERM[@]}"; do stop_pid TERM "$pid"; done
    for pid in "${PIDS_INT[@]}"; do stop_pid INT "$pid"; done
    if ((POLICY_ADDED)); then rm -f /usr/sbin/policy-rc.d; fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- install what is missing ---------------------------------------------------
pg_bin_dir() { find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

install_missing() {
    local need=()
    command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null ||
        need+=(redis-server redis-tools)
    local pgbin
    pgbin=$(pg_bin_dir)
    [[ -n $pgbin && -x $pgbin/initdb && -x $pgbin/pgbench ]] || need+=(postgresql)
    command -v jq >/dev/null || need+=(jq)
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}: run as root, or install them first"
    log "installing ${need[*]} from Debian's packages"
    # Keep the packages' own services from starting: we start our own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_ADDED=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    if ((POLICY_ADDED)); then rm -f /usr/sbin/policy-rc.d; POLICY_ADDED=0; fi
}

free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free loopback port found"
}

median() { # median of the arguments (numbers)
    printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}

now_s() { date +%s.%N; }

# --- results ----------------------------------------------------------------------
declare -A OPS P99 BOOKS NAME
record() { # record WORKLOAD SYSTEM OPS P99 BOOKS
    local key="$1/$2"
    OPS[$key]="${OPS[$key]:-} $3"
    P99[$key]="${P99[$key]:-} $4"
    BOOKS[$key]="${BOOKS[$key]:-} $5"
}

# --- Redis ------------------------------------------------------------------------
REDIS_PORT=""
REDIS_SHA=""
redis_cli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

start_redis() {
    REDIS_PORT=$(free_port)
    mkdir -p "$WORK/redis"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" \
        --appendonly yes --appendfsync always --save '' --protected-mode yes \
        --maxclients 1000 --logfile "$WORK/redis/redis.log" &
    PIDS_TERM+=("$!")
    for _ in $(seq 1 100); do
        [[ $(redis_cli ping 2>/dev/null || true) == PONG ]] && break
        sleep 0.1
    done
    [[ $(redis_cli ping) == PONG ]] || die "redis-server did not start (see $WORK/redis/redis.log)"
    # KEYS[1] stock counter, KEYS[2] buyers hash; ARGV[1] the buyer.
    REDIS_SHA=$(redis_cli SCRIPT LOAD "
        local left = tonumber(redis.call('GET', KEYS[1]) or '0')
        if left >= 1 then
            redis.call('DECR', KEYS[1])
            redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
            return 1
        end
        return 0")
    log "redis $(redis-server --version | awk '{print $3}') on 127.0.0.1:$REDIS_PORT (appendfsync always)"
}

redis_reset() { # redis_reset STOCK
    redis_cli DEL stock buyers >/dev/null
    redis_cli SET stock "$1" >/dev/null
}

redis_bench() { # redis_bench REQUESTS -> csv line
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CLIENTS" -n "$1" -r "$BUYERS" --csv \
        EVALSHA "$REDIS_SHA" 2 stock buyers 'buyer-__rand_int__' | tail -n 1
}

redis_phase() { # redis_phase WORKLOAD STOCK
    local stock=$2 pilot requests line ops p99 sold left books
    redis_reset "$stock"
    pilot=$(redis_bench "$REDIS_PILOT_REQUESTS" | tr -d '"' | cut -d, -f2)
    requests=$(awk -v r="$pilot" -v s="$PHASE_SECS" 'BEGIN {n = int(r * s); if (n < 10000) n = 10000; print n}')
    redis_reset "$stock"
    local t0 t1
    t0=$(now_s)
    line=$(redis_bench "$requests" | tr -d '"')
    t1=$(now_s)
    ops=$(echo "$line" | cut -d, -f2)
    p99=$(echo "$line" | cut -d, -f7)
    left=$(redis_cli GET stock)
    sold=$(redis_cli EVAL "local s = 0 for _, v in ipairs(redis.call('HVALS', KEYS[1])) do s = s + tonumber(v) end return s" 1 buyers)
    if ((left + sold == stock && left >= 0)); then books=ok; else books=VIOLATED; fi
    log "redis $1: $requests requests in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s, $ops ops/s, p99 $p99 ms, granted $sold, books $books"
    record "$1" redis "$ops" "$p99" "$books"
}

# --- PostgreSQL ------------------------------------------------------------------------
PGBIN=""
PGPORT=""
PGDATA=""
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_q() { "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

start_postgres() {
    PGBIN=$(pg_bin_dir)
    PGPORT=$(free_port)
    PGDATA=$WORK/pg/data
    mkdir -p "$WORK/pg/sock"
    if [[ $(id -u) == 0 ]]; then chown -R postgres: "$WORK/pg"; fi
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-instructions >/dev/null
    as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK/pg/sock'
max_connections = $((CLIENTS + 20))
fsync = on
synchronous_commit = on
full_page_writes = on
EOF
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg/postgres.log" -w -t 60 start >/dev/null
    PIDS_INT+=("$(head -n 1 "$PGDATA/postmaster.pid")")
    psql_q <<'EOF'
CREATE TABLE stock (sku text PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0));
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    sku text NOT NULL,
    buyer int NOT NULL,
    qty int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
EOF
    cat >"$WORK/pg/flash_sale.sql" <<'EOF'
\set buyer random(1, :buyers)
WITH taken AS (
    UPDATE stock SET available = available - 1
     WHERE sku = 'hot' AND available >= 1
    RETURNING sku
)
INSERT INTO orders (sku, buyer, qty) SELECT sku, :buyer, 1 FROM taken;
EOF
    log "postgresql $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT (synchronous_commit on, fsync on)"
}

postgres_phase() { # postgres_phase WORKLOAD STOCK RUN
    local stock=$2 prefix="$WORK/pg/log-$1-$3" out ops p99 left sold books
    psql_q -c "TRUNCATE orders; DELETE FROM stock; INSERT INTO stock VALUES ('hot', $stock);"
    psql_q -c "VACUUM ANALYZE"
    psql_q -c "CHECKPOINT"
    out=$("$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PGPORT" -U postgres -c "$CLIENTS" -j 2 -T "$PHASE_SECS" \
        -M prepared -D buyers="$BUYERS" -f "$WORK/pg/flash_sale.sql" --log --log-prefix="$prefix" postgres 2>&1)
    ops=$(echo "$out" | awk '/^tps = / {print $3; exit}')
    [[ -n $ops ]] || die "pgbench printed no tps: $out"
    # Per-transaction log: client, transaction, latency in us, ...
    p99=$(cat "$prefix".* | awk '{print $3}' | sort -n |
        awk '{v[NR]=$1} END {i = int(NR * 0.99 + 0.5); if (i < 1) i = 1; printf "%.3f", v[i] / 1000}')
    left=$(psql_q -c "SELECT available FROM stock WHERE sku = 'hot'")
    sold=$(psql_q -c "SELECT count(*) FROM orders")
    if ((left + sold == stock && left >= 0)); then books=ok; else books=VIOLATED; fi
    rm -f "$prefix".*
    log "postgresql $1: $ops tps, p99 $p99 ms, granted $sold, books $books"
    record "$1" postgresql "$ops" "$p99" "$books"
}

# --- flashcore --------------------------------------------------------------------------
LOADTEST=$TARGET_DIR/release/loadtest
FLASHCORE=$TARGET_DIR/release/flashcore
HAVE_FLASHCORE=0

flashcore_phase() { # flashcore_phase WORKLOAD STOCK PER_USER_LIMIT RUN
    local out="$WORK/flashcore-$1-$4" rc=0 ops p99 books
    TMPDIR=$WORK "$LOADTEST" flash-sale --spawn --server-bin "$FLASHCORE" --durability strict \
        --buyers "$BUYERS" --stock "$2" --per-user-limit "$3" --connections "$CLIENTS" \
        --duration "${PHASE_SECS}s" --out "$out" >"$out.log" 2>&1 || rc=$?
    if [[ ! -f $out/report.json ]]; then
        log "flashcore $1: the load tester failed (exit $rc); its output:"
        cat "$out.log" >&2
        record "$1" flashcore 0 0 FAILED
        return 0
    fi
    ops=$(jq -r '.throughput_rps' "$out/report.json")
    p99=$(jq -r '.latency_ms.p99' "$out/report.json")
    if [[ $(jq -r '.books.ok' "$out/report.json") == true && $rc == 0 ]]; then books=ok; else books=VIOLATED; fi
    log "flashcore $1: $ops req/s, p99 $p99 ms, granted $(jq -r '.ok' "$out/report.json"), books $books (exit $rc)"
    record "$1" flashcore "$ops" "$p99" "$books"
}

# --- main -------------------------------------------------------------------------------
install_missing
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashcore-baselines.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$SUMMARY_DIR"

log "building the load tester (cargo build --release -p loadtest)"
(cd "$ROOT" && cargo build --release -p loadtest --quiet)
if [[ -x $FLASHCORE ]]; then
    HAVE_FLASHCORE=1
else
    log "skipping the flashcore rows: $FLASHCORE is missing (run \`cargo build --release\` at the workspace root first)"
fi

start_redis
start_postgres
NAME[redis]="redis $(redis-server --version | awk '{print $3}' | sed 's/^v=//') Lua, appendfsync always"
NAME[postgresql]="postgresql $("$PGBIN/postgres" --version | awk '{print $3}') UPDATE+INSERT, sync commit"
NAME[flashcore]="flashcore strict (loadtest flash-sale)"

for run in $(seq 1 "$RUNS"); do
    for workload in $WORKLOADS; do
        case $workload in
        sale) stock=$STOCK limit=1 ;;
        grants) stock=$BIG_STOCK limit=$BIG_PER_USER_LIMIT ;;
        *) die "unknown workload $workload (sale, grants)" ;;
        esac
        log "run $run/$RUNS, workload $workload: $CLIENTS clients, ${PHASE_SECS} s, stock $stock"
        redis_phase "$workload" "$stock"
        postgres_phase "$workload" "$stock" "$run"
        if ((HAVE_FLASHCORE)); then flashcore_phase "$workload" "$stock" "$limit" "$run"; fi
    done
done

{
    echo
    echo "Flash sale, same work on each system: $CLIENTS clients, ${PHASE_SECS} s phases, $BUYERS buyers,"
    echo "sale = $STOCK units then sold out, grants = every request a durable grant; $RUNS run(s), medians."
    echo "Machine: $(nproc) cores, $(uname -sr); load generator and server share it; all on 127.0.0.1."
    printf '%-8s %-48s %12s %9s %6s %13s %13s\n' workload system "ops/s" "p99 ms" books "fc ops ratio" "fc p99 ratio"
    for workload in $WORKLOADS; do
        fc_key="$workload/flashcore"
        fc_ops=""
        fc_p99=""
        if [[ -n ${OPS[$fc_key]:-} ]]; then
            # shellcheck disable=SC2086 # word splitting of the run list is intended
            fc_ops=$(median ${OPS[$fc_key]})
            # shellcheck disable=SC2086
            fc_p99=$(median ${P99[$fc_key]})
        fi
        for system in redis postgresql flashcore; do
            key="$workload/$system"
            [[ -n ${OPS[$key]:-} ]] || continue
            # shellcheck disable=SC2086
            ops=$(median ${OPS[$key]})
            # shellcheck disable=SC2086
            p99=$(median ${P99[$key]})
            books=ok
            [[ ${BOOKS[$key]} == *VIOLATED* || ${BOOKS[$key]} == *FAILED* ]] && books=BAD
            if [[ -n $fc_ops && $system != flashcore ]]; then
                ratio_ops=$(awk -v a="$fc_ops" -v b="$ops" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}')
                ratio_p99=$(awk -v a="$fc_p99" -v b="$p99" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}')
            else
                ratio_ops="-"
                ratio_p99="-"
            fi
            printf '%-8s %-48s %12.1f %9.2f %6s %13s %13s\n' "$workload" "${NAME[$system]}" "$ops" "$p99" "$books" "$ratio_ops" "$ratio_p99"
        done
    done
    if ((!HAVE_FLASHCORE)); then
        echo "(no flashcore rows: $FLASHCORE is missing; run \`cargo build --release\` first)"
    fi
    echo "fc ops ratio = flashcore ops/s / this system's (above 1: flashcore serves more);"
    echo "fc p99 ratio = flashcore p99 / this system's (below 1: flashcore answers faster)."
} | tee "$SUMMARY_DIR/summary.txt"
