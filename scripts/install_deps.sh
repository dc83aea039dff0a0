#!/usr/bin/env bash
# install_deps.sh: installs every Debian 12 package dserve builds, tests and
# benchmarks with. Idempotent: packages already present are left as they are.
# Used by the README, by .ci/run and by the container builds.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git
  # RPC and base libraries
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev libcpp-httplib-dev libre2-dev libxxhash-dev libicu-dev
  libyaml-cpp-dev
  # KV transport
  libucx-dev ucx-utils
  # math
  libopenblas-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev
  # numerical reference (float64 PyTorch forward pass)
  python3-numpy python3-torch
)

# The tokenizer tests compare against a JavaScript reference run with node;
# its packages come from npm at test time. Debian's nodejs/npm only when the
# machine has no node of its own (a packaged node may already provide npm).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install_deps: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
