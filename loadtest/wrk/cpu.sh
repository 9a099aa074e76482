#!/usr/bin/env bash
# Where a request's cost goes: compare.sh with 8 s of wrk per run, the durable
# grants and sold-out (no key) workloads only. Prints, for flashcore, the
# axum + Redis peer (its front and Redis together, and apart) and the bare
# hello: requests/s, CPU microseconds per request and context switches per
# request, medians of RUNS interleaved runs.
#
# Usage: loadtest/wrk/cpu.sh
# Knobs: as compare.sh's (RUNS=3, FLASHCORE=target/release/flashcore,
#   PEER, OTHER_PEER, ...); SECS and WORKLOADS default to 8 and "grants soldout".
set -euo pipefail
export SECS=${SECS:-8}
export WORKLOADS=${WORKLOADS:-grants soldout}
exec "$(dirname "${BASH_SOURCE[0]}")/compare.sh" "$@"
