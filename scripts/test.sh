#!/usr/bin/env bash
# Builds qinggeng with every test and runs them all (the README's test command; .ci/run calls
# exactly this). Installs missing Debian packages first. GPU tests report themselves skipped
# on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DQG_BUILD_TESTS=ON -DQG_WARNINGS_AS_ERRORS=ON
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs" --timeout 900
