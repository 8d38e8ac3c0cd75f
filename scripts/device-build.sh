#!/usr/bin/env bash
# Builds qinggeng on the GPU machine (Ubuntu 24.04 image: nvcc, cuBLAS, sentencepiece,
# Catch2 v3, Google Benchmark; simdjson missing). The Debian simdjson packages travel in
# .debs/ (fetched here by `scripts/fetch-device-debs.sh`) and are unpacked into a private
# prefix, never into /.
#   usage: scripts/device-build.sh BUILD_DIR [extra cmake args...]
set -euo pipefail
build=${1:?build dir}
shift
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/tmp/qg-debs
if [ -d "$src/.debs" ] && [ ! -d "$prefix/usr" ]; then
  for deb in "$src"/.debs/*.deb; do dpkg -x "$deb" "$prefix"; done
fi
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix/usr" -DCMAKE_CUDA_ARCHITECTURES=90 "$@"
cmake --build "$build" -j "$(nproc)"
