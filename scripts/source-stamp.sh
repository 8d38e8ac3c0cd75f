#!/usr/bin/env bash
# Prints one hash of the source files a build reads (CMake files, include/, lib/, tests/,
# bench/, apps/, examples/, cmake/), by path and content. It needs no git, so it gives the same
# hash here and on the GPU machine, which gets a copy of the working tree without .git.
# scripts/device-prebuild.sh stamps its build with it; scripts/device-verify.sh compares.
set -euo pipefail
cd "$(dirname "$0")/.."
find CMakeLists.txt include lib tests bench apps examples cmake -type f \
    ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
  LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -d' ' -f1
