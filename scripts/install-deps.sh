#!/usr/bin/env bash
# Installs the Debian packages qinggeng builds against (idempotent; needs root or sudo).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is optional: without nvcc the CPU-only library builds.
set -euo pipefail
packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libsentencepiece-dev sentencepiece
  libsimdjson-dev
  catch2
  libbenchmark-dev
  libcurl4-openssl-dev libcpp-httplib-dev libcli11-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all Debian packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
