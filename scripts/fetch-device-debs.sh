#!/usr/bin/env bash
# Downloads (does not install) the Debian packages the GPU machine's image lacks into .debs/,
# a git-ignored folder that device runs carry and scripts/device-build.sh unpacks.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .debs
cd .debs
apt-get download libsimdjson-dev libsimdjson14
