// Training-backward GEMM benchmarks: qg::cuda::gemm_f16_nn (dX = dY · W, fp16 out) and
// gemm_f16_tn (dW = dY^T · X, fp32 out) against cuBLAS (cublasGemmEx, fp32 accumulation) on
// ChatGLM-6B's layers at 2048 tokens, plus the cross-entropy dhidden product (512 tokens
// against the 130528-row lm_head, split-K). Operands are allocated once per shape and not
// rotated: every shape here moves well over L2 per call or is compute-bound.
#include "qinggeng/cuda/gemm_backward.h"

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "cuda/gemm_backward_paths.h"
#include "qinggeng/error.h"

namespace qg::bench {
namespace {

constexpr int kBatches = 10;  // timed batches per benchmark (median taken over these)
constexpr int kReps = 5;      // launches per timed batch

struct BackwardShape {
  const char* name;
  bool tn;  ///< gemm_f16_tn (dW) instead of gemm_f16_nn (dX)
  std::int64_t M, N, K;
  bool residual = false;  ///< dX with the step's residual epilogue (y = residual * alpha + acc)
};

constexpr BackwardShape kShapes[] = {
    {"qkv dX", false, 2048, 4096, 12288},
    {"qkv dX + residual", false, 2048, 4096, 12288, true},
    {"dense dX", false, 2048, 4096, 4096},
    {"h_to_4h dX", false, 2048, 4096, 16384},
    {"h_to_4h dX + residual", false, 2048, 4096, 16384, true},
    {"4h_to_h dX", false, 2048, 16384, 4096},
    {"CE dhidden", false, 512, 4096, 130528},
    {"qkv dW", true, 12288, 4096, 2048},
    {"h_to_4h dW", true, 4096, 16384, 2048},
};

void bench_backward(benchmark::State& state, BackwardShape s) {
  const int M = static_cast<int>(s.M), N = static_cast<int>(s.N), K = static_cast<int>(s.K);
  // NN: a = dY [M, K], b = W [K, N]; TN: a = dY [K, M], b = X [K, N].
  RandomHalfBuffer a(static_cast<std::size_t>(s.M * s.K), 1.0f);
  RandomHalfBuffer b(static_cast<std::size_t>(s.K * s.N), 0.03f);
  RandomHalfBuffer y(static_cast<std::size_t>(s.M * s.N) * 2, 1.0f);  // room for fp32
  RandomHalfBuffer residual(s.residual ? static_cast<std::size_t>(s.M * s.N) : 1, 1.0f);
  cuda::GemmNnEpilogue epilogue;
  if (s.residual) {
    epilogue.residual = residual.data();
    epilogue.alpha = 2.0f;
  }
  const float one = 1.0f, zero = 0.0f;
  auto ours = [&](int) {
    if (s.tn) {
      cuda::gemm_f16_tn(a.data(), b.data(), reinterpret_cast<float*>(y.data()), false, s.M, s.N,
                        s.K, nullptr);
    } else {
      cuda::gemm_f16_nn(a.data(), b.data(), y.data(), false, s.M, s.N, s.K, epilogue, nullptr);
    }
  };
  auto reference = [&](int) {
    // Column-major views: NN is Y^T = W^T dY^T (both N), TN is Y^T = X^T (dY^T)^T.
    const cublasStatus_t status =
        s.tn ? cublasGemmEx(cublas(), CUBLAS_OP_N, CUBLAS_OP_T, N, M, K, &one, b.data(), CUDA_R_16F,
                            N, a.data(), CUDA_R_16F, M, &zero, y.data(), CUDA_R_32F, N,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
             : cublasGemmEx(cublas(), CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, b.data(), CUDA_R_16F,
                            N, a.data(), CUDA_R_16F, K, &zero, y.data(), CUDA_R_16F, N,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS) fail("cublasGemmEx failed with status ", status);
  };
  // The mma.sync family alone (what A100 / RTX 3090 run); NN on sm_90 otherwise uses wgmma.
  auto ours_mma_sync = [&](int i) {
    cuda::force_gemm_backward_path(cuda::GemmBackwardPath::MmaSync);
    ours(i);
    cuda::force_gemm_backward_path(cuda::GemmBackwardPath::Auto);
  };
  time_ms(ours, 2, nullptr);  // warm-up: module load, smem opt-in, handle, memory pool
  time_ms(ours_mma_sync, 2, nullptr);
  time_ms(reference, 2, nullptr);
  std::vector<double> ours_ms, mma_sync_ms, ref_ms;
  for (auto _ : state) {
    const double t = time_ms(ours, kReps, nullptr);
    ours_ms.push_back(t);
    mma_sync_ms.push_back(time_ms(ours_mma_sync, kReps, nullptr));
    ref_ms.push_back(time_ms(reference, kReps, nullptr));
    state.SetIterationTime(t * 1e-3);
  }
  check_cuda(cudaGetLastError(), "benchmark launches");
  const double t = median(ours_ms), r = median(ref_ms), t_mma = median(mma_sync_ms);
  const double flop = 2.0 * static_cast<double>(s.M) * s.N * s.K;
  state.counters["us"] = t * 1e3;
  state.counters["cublas_us"] = r * 1e3;
  state.counters["TFLOPs"] = flop / (t * 1e-3) / 1e12;
  state.counters["cublas_TFLOPs"] = flop / (r * 1e-3) / 1e12;
  state.counters["pct_cublas"] = 100.0 * r / t;
  state.counters["mma_sync_TFLOPs"] = flop / (t_mma * 1e-3) / 1e12;
  table_row(
      "Backward GEMM: gemm_f16_nn (fp16 out) / gemm_f16_tn (fp32 out) vs cuBLAS",
      {"product", "M", "N", "K", "ours us", "cuBLAS us", "ours TFLOP/s", "cuBLAS TFLOP/s",
       "% of cuBLAS", "mma.sync only TFLOP/s", "mma.sync % of cuBLAS"},
      {s.name, std::to_string(s.M), std::to_string(s.N), std::to_string(s.K), cell(t * 1e3, 1),
       cell(r * 1e3, 1), cell(flop / (t * 1e-3) / 1e12, 1), cell(flop / (r * 1e-3) / 1e12, 1),
       cell(100.0 * r / t, 0), cell(flop / (t_mma * 1e-3) / 1e12, 1), cell(100.0 * r / t_mma, 0)});
}

const bool registered = [] {
  for (const BackwardShape& s : kShapes) {
    std::string name = std::string("gemm_backward/") + s.name;
    for (char& c : name) c = c == ' ' ? '_' : c;
    register_kernel_benchmark(name, kBatches, bench_backward, s);
  }
  return true;
}();

}  // namespace
}  // namespace qg::bench
