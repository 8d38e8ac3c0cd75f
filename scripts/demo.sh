#!/usr/bin/env bash
# Installs missing Debian packages, builds qinggeng, and starts the chat demo (the README's
# first command). Arguments go to qg-chat, e.g. `scripts/demo.sh --model /path/to/chatglm-6b`;
# with none it chats with the tiny bundled demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "$(nproc)" --target qg-chat
exec build/bin/qg-chat "$@"
