#!/usr/bin/env bash
# Rebuilds the bundled demo model data/demo-model (what qg-chat runs with no --model): the demo
# tokenizer (scripts/make_demo_tokenizer.sh) plus a tiny randomly initialised ChatGLM in f16.
# It is untrained: it demonstrates the program, not medical knowledge.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja > /dev/null
cmake --build build --target qg-init
build/bin/qg-init --out data/demo-model --tokenizer data/demo-model \
  --hidden 128 --layers 2 --heads 4 --max-seq 512 --seed 2024 --dtype f16
ls -l data/demo-model
