#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), the two programs scripts/device-verify.sh runs on
# the GPU machine -- qg_cuda_tests and qg_bench, for sm_90 only -- and packs them with
# libqinggeng and the Debian libraries they link (sentencepiece, simdjson, Google Benchmark)
# into .carry-device/ (git-ignored). A device call that carries .carry-device then starts
# testing at once instead of building for about two minutes; device-verify.sh uses the pack
# only while the source tree hashes as it did here (scripts/source-stamp.sh) and the programs
# find every library there, and builds as before otherwise.
#   usage: scripts/device-prebuild.sh [BUILD_DIR]   (default build-device; a fresh build dir
#   took about 4 minutes on 2 cores with ccache warm, an incremental one under 1)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$src/build-device}
pack=$src/.carry-device
stamp=$("$src/scripts/source-stamp.sh")
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQG_BUILD_TESTS=ON \
  -DQG_BUILD_BENCH=ON -DCMAKE_CUDA_ARCHITECTURES=90
cmake --build "$build" -j "$(nproc)" --target qg_cuda_tests qg_bench
if [ "$stamp" != "$("$src/scripts/source-stamp.sh")" ]; then
  echo "the sources changed during the build; run again" >&2
  exit 1
fi
rm -rf "$pack.tmp"
mkdir -p "$pack.tmp/bin" "$pack.tmp/lib" "$pack.tmp/debs"
cp "$build/bin/qg_cuda_tests" "$build/bin/qg_bench" "$pack.tmp/bin/"
cp -P "$build"/lib/libqinggeng.so* "$pack.tmp/lib/"
strip --strip-unneeded "$pack.tmp/bin/"* "$pack.tmp/lib/libqinggeng.so".*.*
(cd "$pack.tmp/debs" && apt-get download libsentencepiece0 libsimdjson14 libbenchmark1debian)
echo "$stamp" > "$pack.tmp/stamp"
rm -rf "$pack"
mv "$pack.tmp" "$pack"
du -sh "$pack"
