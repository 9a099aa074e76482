#!/usr/bin/env bash
# A flat tail, measured (issue 18): for each flashcore binary given, in turn,
# RUNS times (interleaved, so every build meets the same noise):
#
#   1. the peak: the load tester's open loop far above what the server can
#      take (`overload --rate 40000`, 10 s), its served rate read back;
#   2. the steady run: the open loop at half that peak (measured in the same
#      run, just before), SECS seconds, strict, BUYERS users, a snapshot
#      every SNAPSHOT_EVERY events (so a 180 s run crosses at least six).
#
# The open loop sends on schedule whatever the answers do and measures each
# request from the moment it was due (no coordinated omission). Each run
# leaves report.json (per-second p99 beside the server's background steps,
# see loadtest/README.md) and server.log (one "snapshot written" line per
# snapshot) in OUT/<binary>-<run>; one summary line per run goes to stdout
# and OUT/summary.tsv.
#
# Usage: loadtest/tail.sh BIN [BIN...]
# Knobs: RUNS=2 SECS=180 SNAPSHOT_EVERY=150000 BUYERS=1000 OUT=target/tail
#        LOADTEST=target/release/loadtest
# Needs jq. Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail

RUNS=${RUNS:-2}
SECS=${SECS:-180}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-150000}
BUYERS=${BUYERS:-1000}
OUT=${OUT:-target/tail}
LOADTEST=${LOADTEST:-target/release/loadtest}

command -v jq >/dev/null || { echo "tail.sh: needs jq (apt-get install jq)" >&2; exit 1; }
[ "$#" -ge 1 ] || { echo "usage: loadtest/tail.sh BIN [BIN...]" >&2; exit 1; }
for bin in "$@"; do
  [ -x "$bin" ] || { echo "tail.sh: $bin is not an executable" >&2; exit 1; }
done
mkdir -p "$OUT"
summary="$OUT/summary.tsv"
printf 'build\trun\tpeak_rps\trate\tok\tp50_ms\tp99_ms\tp999_ms\tmax_ms\tsnapshots\tbooks_ok\n' | tee "$summary"

for run in $(seq "$RUNS"); do
  for bin in "$@"; do
    name=$(basename "$bin")
    peak_dir="$OUT/$name-$run-peak"
    "$LOADTEST" overload --spawn --server-bin "$bin" --rate 40000 --duration 10s \
      --buyers "$BUYERS" --progress off --out "$peak_dir" >/dev/null
    peak=$(jq -r '.throughput_rps | floor' "$peak_dir/report.json")
    rate=$((peak / 2))
    dir="$OUT/$name-$run"
    FLASHCORE_SNAPSHOT_EVERY_EVENTS=$SNAPSHOT_EVERY "$LOADTEST" overload --spawn \
      --server-bin "$bin" --rate "$rate" --duration "${SECS}s" --buyers "$BUYERS" \
      --max-requests $((rate * SECS + 1)) --progress off --out "$dir" >"$dir.txt"
    snapshots=$(grep -c "snapshot written" "$dir/server.log" || true)
    jq -r --arg b "$name" --arg r "$run" --arg p "$peak" --arg rate "$rate" --arg s "$snapshots" \
      '[$b, $r, $p, $rate, .ok, .latency_ms.p50, .latency_ms.p99, .latency_ms.p999,
        .latency_ms.max, $s, .books.ok] | @tsv' "$dir/report.json" | tee -a "$summary"
  done
done
