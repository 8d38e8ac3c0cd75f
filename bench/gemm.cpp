// GEMM benchmarks: qg::cuda::gemm_f16 against cuBLAS (cublasGemmEx, fp16 in/out, fp32
// accumulation) on ChatGLM-6B's linear layers for decode (M = 1..16, skinny path) and prefill
// (M = 64..2048, tiled, or skinny where gemm_plan says so). Weights and activations rotate
// over enough copies that L2 (50 MB on H100) never holds them between calls, as in a real
// forward pass over 28 layers. At M = 2048 each layer also runs with the fused epilogue the
// model gives it (bias, bias + gelu, bias + residual), timed against cuBLAS's plain product.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/error.h"

namespace qg::bench {
namespace {

constexpr std::int64_t kTokens[] = {1, 4, 16, 64, 512, 1024, 2048};
constexpr std::int64_t kMaxTokens = 2048;
constexpr int kBatches = 15;  // timed batches per benchmark (median taken over these)
constexpr int kReps = 10;     // launches per timed batch

/// Buffers of one weight shape, kept while consecutive benchmarks use that shape.
struct Workspace {
  std::int64_t N = 0, K = 0;
  int copies = 0;
  std::vector<std::unique_ptr<RandomHalfBuffer>> w, x;
  std::unique_ptr<RandomHalfBuffer> y, bias, residual;
};

Workspace& workspace_for(std::int64_t N, std::int64_t K) {
  static Workspace ws;
  if (ws.N != N || ws.K != K) {
    ws = Workspace{};
    ws.N = N;
    ws.K = K;
    const double weight_bytes = 2.0 * static_cast<double>(N * K);
    const double rotate_bytes = 3.0 * 50e6;  // three times H100's L2
    ws.copies = weight_bytes >= rotate_bytes ? 1 : static_cast<int>(rotate_bytes / weight_bytes) + 1;
    for (int c = 0; c < ws.copies; ++c) {
      ws.w.push_back(std::make_unique<RandomHalfBuffer>(static_cast<std::size_t>(N * K), 0.03f));
      ws.x.push_back(
          std::make_unique<RandomHalfBuffer>(static_cast<std::size_t>(kMaxTokens * K), 1.0f));
    }
    ws.y = std::make_unique<RandomHalfBuffer>(static_cast<std::size_t>(kMaxTokens * N), 1.0f);
    ws.bias = std::make_unique<RandomHalfBuffer>(static_cast<std::size_t>(N), 0.5f);
    ws.residual =
        std::make_unique<RandomHalfBuffer>(static_cast<std::size_t>(kMaxTokens * N), 1.0f);
  }
  return ws;
}

using Kind = cuda::GemmEpilogue::Kind;

/// The epilogue each ChatGLM-6B layer runs in the model (qkv: bias; dense and 4h_to_h: bias +
/// residual; h_to_4h: bias + gelu; lm_head: none).
Kind model_epilogue(const LinearShape& shape) {
  const std::string name = shape.name;
  if (name == "qkv") return Kind::Bias;
  if (name == "h_to_4h") return Kind::BiasGelu;
  if (name == "dense" || name == "4h_to_h") return Kind::BiasResidual;
  return Kind::None;
}

const char* epilogue_name(Kind kind) {
  switch (kind) {
    case Kind::Bias: return " + bias";
    case Kind::BiasGelu: return " + bias, gelu";
    case Kind::BiasResidual: return " + bias, residual";
    default: return "";
  }
}

void bench_linear(benchmark::State& state, LinearShape shape, std::int64_t M, Kind kind) {
  const std::int64_t N = shape.N, K = shape.K;
  Workspace& ws = workspace_for(N, K);
  cuda::GemmEpilogue epilogue;
  epilogue.kind = kind;
  if (kind != Kind::None) epilogue.bias = ws.bias->data();
  if (kind == Kind::BiasResidual) {
    epilogue.residual = ws.residual->data();
    epilogue.alpha = 7.48f;  // ChatGLM-6B's sqrt(2 * 28 layers)
  }
  auto ours = [&](int i) {
    const int c = i % ws.copies;
    cuda::gemm_f16(ws.x[c]->data(), ws.w[c]->data(), ws.y->data(), false, M, N, K, epilogue,
                   nullptr);
  };
  const float one = 1.0f, zero = 0.0f;
  auto reference = [&](int i) {
    const int c = i % ws.copies;
    // Row-major Y = X W^T is column-major Y^T = W X^T.
    const cublasStatus_t status = cublasGemmEx(
        cublas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
        static_cast<int>(K), &one, ws.w[c]->data(), CUDA_R_16F, static_cast<int>(K),
        ws.x[c]->data(), CUDA_R_16F, static_cast<int>(K), &zero, ws.y->data(), CUDA_R_16F,
        static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS) fail("cublasGemmEx failed with status ", status);
  };
  time_ms(ours, 2 * ws.copies, nullptr);  // warm-up: module load, smem opt-in, handle
  time_ms(reference, 2 * ws.copies, nullptr);
  std::vector<double> ours_ms, ref_ms;
  for (auto _ : state) {
    const double t = time_ms(ours, kReps, nullptr);
    ours_ms.push_back(t);
    ref_ms.push_back(time_ms(reference, kReps, nullptr));
    state.SetIterationTime(t * 1e-3);
  }
  check_cuda(cudaGetLastError(), "benchmark launches");
  const double t = median(ours_ms), r = median(ref_ms);
  const double flop = 2.0 * static_cast<double>(M) * N * K;
  const double weight_gbps = 2.0 * static_cast<double>(N) * K / (t * 1e-3) / 1e9;
  const Peaks& peak = peaks();
  state.counters["us"] = t * 1e3;
  state.counters["cublas_us"] = r * 1e3;
  state.counters["TFLOPs"] = flop / (t * 1e-3) / 1e12;
  state.counters["cublas_TFLOPs"] = flop / (r * 1e-3) / 1e12;
  state.counters["pct_cublas"] = 100.0 * r / t;
  state.counters["weight_GBps"] = weight_gbps;
  state.counters["pct_copy_bw"] = 100.0 * weight_gbps / peak.copy_gbps;
  table_row("GEMM: qg::cuda::gemm_f16 vs cuBLAS (fp16 in/out, fp32 accumulate; cuBLAS runs "
            "the plain product, ours the epilogue named in the row, if any)",
            {"layer, M", "N", "K", "kernel", "ours us", "cuBLAS us", "ours TFLOP/s",
             "cuBLAS TFLOP/s", "% of cuBLAS", "ours weight GB/s", "% of copy BW"},
            {std::string(shape.name) + epilogue_name(kind) + ", M=" + std::to_string(M),
             std::to_string(N), std::to_string(K), cuda::gemm_plan(M, N), cell(t * 1e3, 1),
             cell(r * 1e3, 1), cell(flop / (t * 1e-3) / 1e12, 1),
             cell(flop / (r * 1e-3) / 1e12, 1), cell(100.0 * r / t, 0), cell(weight_gbps, 0),
             cell(100.0 * weight_gbps / peak.copy_gbps, 0)});
}

void bench_peaks(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(peaks());
  state.counters["copy_GBps"] = peaks().copy_gbps;
  state.counters["cublas_8192_TFLOPs"] = peaks().cublas_tflops;
}

const bool registered = [] {
  benchmark::RegisterBenchmark("peaks/copy_and_cublas", bench_peaks)->Iterations(1);
  for (const LinearShape& shape : kChatGlmLinears) {
    for (std::int64_t M : kTokens) {
      const std::string name = std::string("gemm/") + shape.name + "/M=" + std::to_string(M);
      register_kernel_benchmark(name, kBatches, bench_linear, shape, M, Kind::None);
    }
    const Kind fused = model_epilogue(shape);
    if (fused != Kind::None) {
      const std::string name = std::string("gemm/") + shape.name + "_fused/M=" +
                               std::to_string(kMaxTokens);
      register_kernel_benchmark(name, kBatches, bench_linear, shape, kMaxTokens, fused);
    }
  }
  return true;
}();

}  // namespace
}  // namespace qg::bench
