#!/usr/bin/env bash
# One GPU-machine pass over what needs a GPU: builds (scripts/device-build.sh), runs the whole
# CUDA test suite, then times the training step and the whole-model decode / prefill with
# chained launches (QG_CUDA_PDL) off and on; the training step also with the LoRA forward term
# inside the base GEMM (BM_TrainStepLora/<checkpointing>/<lora_in_gemm>). Logs go to $OUT (or
# ./out), one file per run, and a summary of the benchmark lines ends the output. About 7
# minutes on an H100 (most of it building the random 6B models).
#   usage: scripts/device-verify.sh [BUILD_DIR]
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-/tmp/qg-build}
out=${OUT:-$src/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/tmp/qg-debs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$out/gpu.txt" 2>&1
if ! "$src/scripts/device-build.sh" "$build" -DQG_BUILD_TESTS=ON -DQG_BUILD_BENCH=ON \
    > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
bench=$build/bin/qg_bench
timeout 300 "$build/bin/qg_cuda_tests" > "$out/cuda_tests.txt" 2>&1
echo "qg_cuda_tests exit status $?" >> "$out/cuda_tests.txt"
models='TrainStepLora/0/.|BM_ModelDecode/(1|4|16|64)/128/1|BM_ModelDecode/1/1024/1|BM_ModelPrefill'
for pdl in 0 1; do
  QG_CUDA_PDL=$pdl timeout 240 "$bench" --benchmark_filter="$models" > "$out/models_pdl$pdl.txt" 2>&1
done
QG_CUDA_PDL=1 timeout 120 "$bench" --benchmark_filter='TrainStepLora/1/.' \
  > "$out/train_checkpointing_pdl1.txt" 2>&1
timeout 60 "$bench" --benchmark_filter='train/lora' > "$out/lora_kernels.txt" 2>&1
tail -3 "$out/cuda_tests.txt"
for f in "$out"/models_pdl*.txt "$out"/train_checkpointing_pdl1.txt "$out"/lora_kernels.txt; do
  echo "== $(basename "$f")"
  grep -E '^(BM_|train/)' "$f" | cut -c1-150
done
