#!/usr/bin/env bash
# demo.sh: the newcomer's first command. Installs packages, builds, writes the
# bundled tiny model (seeded random weights), brings up a local mesh (router,
# one prefill and one decode worker on loopback, KV over UCX shared memory)
# with `dserve up`, sends one request through it with `dserve generate`, and
# stops the mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target dserve dserve-router dserve-prefill dserve-decode
bin=build/services
"$bin/dserve" model init --preset tiny --seed 0 --out models/tiny

log=$(mktemp)
"$bin/dserve" up --model models/tiny > >(tee "$log") &
up=$!
trap 'kill -TERM "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -f "$log"' EXIT
endpoint=""
for _ in $(seq 1 600); do
  endpoint=$(sed -n 's/^router listening on //p' "$log" | head -n 1)
  [ -n "$endpoint" ] && break
  kill -0 "$up" 2>/dev/null || { echo "demo: dserve up exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$endpoint" ] || { echo "demo: the mesh did not come up" >&2; exit 1; }

"$bin/dserve" generate --endpoint "$endpoint" --prompt "The critical batch size is" \
  --max-tokens 48 --seed 1 --temperature 0.8
echo
