#!/usr/bin/env bash
# bench/mesh_bench.sh: the same open-loop load through a disaggregated mesh
# (1 prefill + 1 decode worker) and an aggregated one (2 aggregated workers),
# one after the other in the same run, on the `small` model. Prints each
# `dserve bench` report.
#
#   bash bench/mesh_bench.sh [--transport shm|tcp] [dserve bench load flags]
#
# Load flags, when given, replace the default load: Poisson 0.5 req/s,
# prompts uniform 64..512 tokens, 32 output tokens, 30 requests, seed 1.
# Build first (cmake --build build --target dserve).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/services
transport=shm
if [ "${1:-}" = "--transport" ]; then transport=$2; shift 2; fi
bench_flags=(--rate 0.5 --prompt-len uniform:64,512 --output-len 32 --requests 30 --seed 1)
if [ $# -gt 0 ]; then bench_flags=("$@"); fi
[ -d models/small ] || "$bin/dserve" model init --preset small --seed 0 --out models/small

run_mesh() {  # $1: label; the rest: `dserve up` flags
  local label=$1; shift
  local log; log=$(mktemp)
  "$bin/dserve" up --model models/small --transport "$transport" "$@" > "$log" 2>/dev/null &
  local up=$!
  local endpoint=""
  for _ in $(seq 1 600); do
    endpoint=$(sed -n 's/^router listening on //p' "$log" | head -n 1)
    [ -n "$endpoint" ] && break
    sleep 0.1
  done
  if [ -z "$endpoint" ]; then
    echo "mesh_bench: the $label mesh did not come up" >&2
    kill -TERM "$up" 2>/dev/null || true
    exit 1
  fi
  echo "== $label: dserve up $* (transport $transport)"
  "$bin/dserve" bench --endpoint "$endpoint" "${bench_flags[@]}"
  kill -TERM "$up"
  wait "$up" || true
  rm -f "$log"
}

run_mesh disaggregated --prefill-workers 1 --decode-workers 1
run_mesh aggregated --aggregated-workers 2
