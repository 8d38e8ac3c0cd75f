#!/usr/bin/env bash
# One GPU-machine pass over what needs a GPU, in stages (all of them by default, in this order):
#   tests    the whole CUDA test suite (qg_cuda_tests)
#   kernels  the LoRA training kernels alone, SIMT and tensor cores (train/lora*), the
#            attention kernels' tile configurations (training forward and backward, prefill),
#            the LayerNorm kernels and the residual GEMM epilogues (plain vs fused, dX with and
#            without the residual)
#   train    the training step, BM_TrainStepLora/<checkpointing>/<variant: bit 1 = LoRA forward
#            term inside the base GEMM, bit 2 = LoRA passes on tensor cores, bit 4 = last layer
#            on the labelled rows, bit 8 = rotary backward inside the attention backward>:
#            variants 0 1 2 3 7 15 without checkpointing and chained launches (QG_CUDA_PDL)
#            off, then variant 15 with and without checkpointing with them on; every variant
#            is timed again with the attention forward's wide tiles (wide_attention_ms)
#   models   whole-model decode and prefill (prefill with narrow and wide attention tiles),
#            chained launches off and on; decode again with the LayerNorm fused into the next
#            GEMM (QG_CUDA_FUSE_LN=1)
#   profile  Nsight Compute on the LoRA training kernels of both kinds
# It builds first (scripts/device-build.sh; incremental when BUILD_DIR is kept), unless the call
# carried .carry-device, made by scripts/device-prebuild.sh from these very sources. Logs go
# to $OUT (or ./out), one file per run, and a summary of the benchmark lines ends the output.
# A run takes up to 10 minutes on a device call, so split the stages over three calls: build +
# tests + kernels (about 4 minutes; 2 less prebuilt), train (about 5; each training-step
# variant builds a random 6B model, about 25 s), models (about 6). A build directory survives
# between calls only while the machine stays warm; the prebuilt pack travels with each call.
#   usage: scripts/device-verify.sh [BUILD_DIR] [STAGE...]
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-/tmp/qg-build}
shift || true
stages=${*:-tests kernels train models profile}
out=${OUT:-$src/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/tmp/qg-debs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$out/gpu.txt" 2>&1
# The programs scripts/device-prebuild.sh packed on the CPU machine run as they are when the
# call carried .carry-device, its stamp is these sources' and every library resolves here.
bin=
pack=$src/.carry-device
if [ -f "$pack/stamp" ] && [ "$(cat "$pack/stamp")" = "$("$src/scripts/source-stamp.sh")" ]; then
  libs=/tmp/qg-prebuilt
  if [ ! -d "$libs/usr" ]; then
    for deb in "$pack"/debs/*.deb; do dpkg -x "$deb" "$libs"; done
  fi
  paths=$pack/lib:$libs/usr/lib/x86_64-linux-gnu:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
  if LD_LIBRARY_PATH=$paths ldd "$pack/bin/qg_cuda_tests" "$pack/bin/qg_bench" 2>&1 |
      tee "$out/build.log" | grep -q 'not found'; then
    echo "prebuilt programs unusable here (not found above); building" >> "$out/build.log"
  else
    export LD_LIBRARY_PATH=$paths
    bin=$pack/bin
    echo "using the prebuilt programs of .carry-device (stamp $(cat "$pack/stamp"))"
  fi
fi
if [ -z "$bin" ]; then
  if ! "$src/scripts/device-build.sh" "$build" -DQG_BUILD_TESTS=ON -DQG_BUILD_BENCH=ON \
      >> "$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    exit 1
  fi
  bin=$build/bin
fi
bench=$bin/qg_bench
models='BM_ModelDecode/(1|4|16|64)/128/1|BM_ModelDecode/1/1024/1|BM_ModelPrefill'
logs=()
for stage in $stages; do
  case $stage in
    tests)
      timeout 300 "$bin/qg_cuda_tests" > "$out/cuda_tests.txt" 2>&1
      echo "qg_cuda_tests exit status $?" >> "$out/cuda_tests.txt"
      tail -3 "$out/cuda_tests.txt" ;;
    kernels)
      timeout 90 "$bench" --benchmark_filter='train/lora' > "$out/lora_kernels.txt" 2>&1
      timeout 180 "$bench" \
        --benchmark_filter='attention_train/|AttentionPrefill/(1024|2048)/|train/layer_norm|gemm/(dense|4h_to_h)(_fused)?/M=2048|gemm_backward/(qkv|h_to_4h)_dX' \
        --qg_markdown="$out/attention.md" > "$out/attention.txt" 2>&1
      logs+=("$out/lora_kernels.txt" "$out/attention.txt") ;;
    train)
      QG_CUDA_PDL=0 timeout 300 "$bench" --benchmark_filter='TrainStepLora/0/' \
        > "$out/train_pdl0.txt" 2>&1
      QG_CUDA_PDL=1 timeout 120 "$bench" --benchmark_filter='TrainStepLora/./15' \
        > "$out/train_pdl1.txt" 2>&1
      logs+=("$out/train_pdl0.txt" "$out/train_pdl1.txt") ;;
    models)
      for pdl in 0 1; do
        QG_CUDA_PDL=$pdl timeout 150 "$bench" --benchmark_filter="$models" \
          > "$out/models_pdl$pdl.txt" 2>&1
        logs+=("$out/models_pdl$pdl.txt")
      done
      # Decode with the LayerNorm fused into the next GEMM, chained launches off and on.
      for pdl in 0 1; do
        QG_CUDA_FUSE_LN=1 QG_CUDA_PDL=$pdl timeout 100 "$bench" \
          --benchmark_filter='BM_ModelDecode/(1|4|16)/128/1|BM_ModelDecode/1/1024/1' \
          > "$out/models_fused_ln_pdl$pdl.txt" 2>&1
        logs+=("$out/models_fused_ln_pdl$pdl.txt")
      done ;;
    profile)
      # The first forward and backward of each kind: 2 passes each (with their sums).
      for kind in lora_qkv_r8 lora_qkv_r8_mma; do
        timeout 150 ncu --kernel-name-base demangled -k 'regex:lora_(pass|mma)_kernel' -c 4 \
          --section SpeedOfLight --section Occupancy --section LaunchStats \
          "$bench" --benchmark_filter="train/$kind/dropout=0.1/packed" \
          > "$out/ncu_$kind.txt" 2>&1
        grep -E 'lora_(pass|mma)_kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occ|Registers Per' \
          "$out/ncu_$kind.txt" | head -40
      done ;;
    *) echo "unknown stage $stage (tests kernels train models profile)"; exit 2 ;;
  esac
done
[ -f "$out/attention.md" ] && grep -A12 -E '^#+ .*(variants|Training attention|LayerNorm|GEMM)' "$out/attention.md"
for f in "${logs[@]}"; do
  echo "== $(basename "$f")"
  grep -E '^(BM_|train/|attention_train/)' "$f" | cut -c1-170
done
