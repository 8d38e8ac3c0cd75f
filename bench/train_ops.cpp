// Training-op benchmarks at ChatGLM-6B's shapes (tokens 2048, hidden 4096):
//  - layer_norm_backward, frozen (dx only) and with dgamma / dbeta, in GB/s of the bytes it
//    must move (x and dy read, dx written) next to the device's copy bandwidth;
//  - LoRA training forward + backward on query_key_value (4096 -> 12288, r 8), dropout 0 and
//    0.1, in microseconds, GB/s of the activation bytes it must move, and as a fraction of the
//    base layer's forward gemm_f16 of the same shape;
//  - the fused cross-entropy over the 130528-token vocabulary (loss, dhidden and dlm_head), in
//    ms and TFLOP/s of its three GEMMs, and the loss alone.
// Times are CUDA-event medians over back-to-back calls (bench_report.h's time_ms).
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bench_report.h"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"

namespace qg::bench {
namespace {

constexpr std::int64_t kTokens = 2048, kHidden = 4096, kQkv = 12288, kVocab = 130528;
constexpr int kBatches = 10;

/// A device array of T, zeroed, freed on destruction.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) {
    check_cuda(cudaMalloc(&ptr_, count * sizeof(T)), "cudaMalloc");
    check_cuda(cudaMemset(ptr_, 0, count * sizeof(T)), "cudaMemset");
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

__half* as_half(const RandomHalfBuffer& b) { return reinterpret_cast<__half*>(b.data()); }

/// Median milliseconds of `fn` over the benchmark's iterations (reps calls each).
template <typename Fn>
double median_ms(benchmark::State& state, Fn fn, int reps) {
  time_ms(fn, 2, nullptr);  // warm-up
  std::vector<double> ms;
  for (auto _ : state) {
    const double t = time_ms(fn, reps, nullptr);
    ms.push_back(t);
    state.SetIterationTime(t * 1e-3);
  }
  check_cuda(cudaGetLastError(), "benchmark launches");
  return median(ms);
}

void bench_layer_norm_forward(benchmark::State& state) {
  const std::int64_t rows = kTokens, cols = kHidden;
  RandomHalfBuffer x(rows * cols, 2.0f), y(rows * cols, 1.0f), gamma(cols, 1.0f), beta(cols, 1.0f);
  DeviceArray<float> mean(rows), rstd(rows);
  const double t = median_ms(
      state,
      [&](int) {
        cuda::layer_norm_forward_stats(as_half(x), as_half(gamma), as_half(beta), 1e-5f, rows, cols,
                                       as_half(y), mean.get(), rstd.get(), nullptr);
      },
      20);
  const double gbps = 2.0 * 2.0 * static_cast<double>(rows * cols) / (t * 1e-3) / 1e9;
  state.counters["us"] = t * 1e3;
  state.counters["GBps"] = gbps;
  table_row("LayerNorm forward with statistics (rows 2048, cols 4096): GB/s of x read, y written",
            {"us", "GB/s", "% of copy BW"},
            {cell(t * 1e3, 1), cell(gbps, 0), cell(100.0 * gbps / peaks().copy_gbps, 0)});
}

void bench_layer_norm_backward(benchmark::State& state, bool param_grads) {
  const std::int64_t rows = kTokens, cols = kHidden;
  RandomHalfBuffer x(rows * cols, 2.0f), dy(rows * cols, 1.0f), dx(rows * cols, 1.0f),
      y(rows * cols, 1.0f), gamma(cols, 1.0f), beta(cols, 1.0f);
  DeviceArray<float> mean(rows), rstd(rows), dgamma(cols), dbeta(cols);
  cuda::layer_norm_forward_stats(as_half(x), as_half(gamma), as_half(beta), 1e-5f, rows, cols,
                                 as_half(y), mean.get(), rstd.get(), nullptr);
  const double t = median_ms(
      state,
      [&](int) {
        cuda::layer_norm_backward(as_half(x), as_half(gamma), mean.get(), rstd.get(), as_half(dy),
                                  rows, cols, as_half(dx), param_grads ? dgamma.get() : nullptr,
                                  param_grads ? dbeta.get() : nullptr, nullptr);
      },
      20);
  const double bytes = 3.0 * 2.0 * static_cast<double>(rows * cols);
  const double gbps = bytes / (t * 1e-3) / 1e9;
  state.counters["us"] = t * 1e3;
  state.counters["GBps"] = gbps;
  table_row("LayerNorm backward (rows 2048, cols 4096): GB/s of x + dy read, dx written",
            {"variant", "us", "GB/s", "% of copy BW"},
            {param_grads ? "dx, dgamma, dbeta" : "dx only (frozen norm)", cell(t * 1e3, 1),
             cell(gbps, 0), cell(100.0 * gbps / peaks().copy_gbps, 0)});
}

/// `packed`: the tokens are 4 examples of 512 rows with their own dropout streams, as in the
/// training step (row_seed / row_position); otherwise one stream over all rows.
void bench_lora_train(benchmark::State& state, float dropout, bool packed,
                      cuda::LoraTrainKernels kernels) {
  cuda::LoraTrainShape shape;
  shape.kernels = kernels;
  shape.tokens = kTokens;
  shape.in = kHidden;
  shape.out = kQkv;
  shape.rank = 8;
  shape.scale = 2.0f;
  shape.dropout = dropout;
  shape.seed = 1234;
  const std::int64_t T = shape.tokens, I = shape.in, O = shape.out, R = shape.rank;
  RandomHalfBuffer x(T * I, 1.0f), y(T * O, 1.0f), dy(T * O, 1.0f), dx(T * I, 1.0f),
      w(O * I, 0.03f);
  DeviceArray<float> a(R * I), b(O * R), u(T * R), da(R * I), db(O * R);
  DeviceArray<std::uint64_t> row_seed(T);
  DeviceArray<std::int32_t> row_position(T);
  if (packed) {
    constexpr std::int64_t kExample = 512;
    std::vector<std::uint64_t> seeds(static_cast<std::size_t>(T));
    std::vector<std::int32_t> positions(static_cast<std::size_t>(T));
    for (std::int64_t t = 0; t < T; ++t) {
      seeds[t] = static_cast<std::uint64_t>(t / kExample + 1) * 0x9E3779B97F4A7C15ull;
      positions[t] = static_cast<std::int32_t>(t % kExample);
    }
    check_cuda(
        cudaMemcpy(row_seed.get(), seeds.data(), T * sizeof(std::uint64_t), cudaMemcpyHostToDevice),
        "cudaMemcpy");
    check_cuda(cudaMemcpy(row_position.get(), positions.data(), T * sizeof(std::int32_t),
                          cudaMemcpyHostToDevice),
               "cudaMemcpy");
    shape.row_seed = row_seed.get();
    shape.row_position = row_position.get();
  }
  const std::size_t bytes = cuda::lora_train_workspace_bytes(shape);
  DeviceArray<char> workspace(bytes);
  auto forward = [&](int) {
    cuda::lora_train_forward(as_half(x), a.get(), b.get(), shape, as_half(y), u.get(),
                             workspace.get(), bytes, nullptr);
  };
  auto backward = [&](int) {
    cuda::lora_train_backward(as_half(x), a.get(), b.get(), u.get(), as_half(dy), shape,
                              as_half(dx), da.get(), db.get(), workspace.get(), bytes, nullptr);
  };
  auto base = [&](int) {
    cuda::gemm_f16(x.data(), w.data(), y.data(), false, T, O, I, cuda::GemmEpilogue{}, nullptr);
  };
  const double t_fwd = median_ms(state, forward, 20);
  const double t_bwd = time_ms(backward, 20, nullptr);
  const double t_base = time_ms(base, 20, nullptr);
  const double t = t_fwd + t_bwd;
  // Activation bytes moved at least: forward x read, y read + written; backward dy read, x read,
  // dx read + written (the fp32 factors and [tokens, rank] intermediates are noise).
  const double min_bytes = 2.0 * (T * I + 2.0 * T * O) + 2.0 * (T * O + T * I + 2.0 * T * I);
  const double gbps = min_bytes / (t * 1e-3) / 1e9;
  state.counters["fwd_us"] = t_fwd * 1e3;
  state.counters["bwd_us"] = t_bwd * 1e3;
  state.counters["GBps"] = gbps;
  table_row(
      "LoRA training (qkv: tokens 2048, in 4096, out 12288, r 8) vs the base forward gemm_f16",
      {"kernels", "dropout", "rows", "forward us", "backward us", "fwd+bwd us", "base gemm us",
       "fwd+bwd / base %", "GB/s (min bytes)", "% of copy BW"},
      {kernels == cuda::LoraTrainKernels::TensorCores ? "tensor cores" : "SIMT", cell(dropout, 1),
       packed ? "4 x 512" : "one stream", cell(t_fwd * 1e3, 1), cell(t_bwd * 1e3, 1),
       cell(t * 1e3, 1), cell(t_base * 1e3, 1), cell(100.0 * t / t_base, 1), cell(gbps, 0),
       cell(100.0 * gbps / peaks().copy_gbps, 0)});
}

void bench_cross_entropy(benchmark::State& state, bool backward) {
  const std::int64_t rows = kTokens, H = kHidden, V = kVocab;
  RandomHalfBuffer hidden(rows * H, 1.0f), lm_head(V * H, 0.03f), dhidden(rows * H, 1.0f);
  DeviceArray<float> nll(rows), dlm_head(backward ? V * H : 1);
  std::vector<int> host_targets(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) host_targets[r] = r % 5 == 0 ? -100 : static_cast<int>((r * 7919) % V);
  DeviceArray<int> targets(rows);
  check_cuda(cudaMemcpy(targets.get(), host_targets.data(), rows * sizeof(int), cudaMemcpyHostToDevice),
             "cudaMemcpy");
  cuda::CrossEntropyTrainOptions options;
  options.normalizer = static_cast<double>(rows);
  options.grad_scale = 1024.0f;
  const std::size_t bytes = cuda::cross_entropy_train_workspace_bytes(rows, V, options);
  DeviceArray<char> workspace(bytes);
  const double t = median_ms(
      state,
      [&](int) {
        cuda::cross_entropy_train(as_half(hidden), as_half(lm_head), targets.get(), rows, H, V,
                                  options, nll.get(), backward ? as_half(dhidden) : nullptr,
                                  backward ? dlm_head.get() : nullptr, workspace.get(), bytes,
                                  nullptr);
      },
      3);
  const double flops = (backward ? 3.0 : 1.0) * 2.0 * rows * H * V;
  const double tflops = flops / (t * 1e-3) / 1e12;
  state.counters["ms"] = t;
  state.counters["TFLOPs"] = tflops;
  table_row("Fused cross-entropy (rows 2048, hidden 4096, vocab 130528, row_chunk 512)",
            {"variant", "ms", "GEMM TFLOP/s", "% of cuBLAS 8192^3"},
            {backward ? "loss + dhidden + dlm_head (3 GEMMs)" : "loss only (1 GEMM)", cell(t, 2),
             cell(tflops, 0), cell(100.0 * tflops / peaks().cublas_tflops, 0)});
}

const bool registered = [] {
  register_kernel_benchmark("train/layer_norm_forward", kBatches, bench_layer_norm_forward);
  register_kernel_benchmark("train/layer_norm_backward/dx", kBatches, bench_layer_norm_backward, false);
  register_kernel_benchmark("train/layer_norm_backward/dx_dgamma_dbeta", kBatches,
                            bench_layer_norm_backward, true);
  for (const auto kernels : {cuda::LoraTrainKernels::Simt, cuda::LoraTrainKernels::TensorCores}) {
    const std::string name = kernels == cuda::LoraTrainKernels::TensorCores
                                 ? "train/lora_qkv_r8_mma"
                                 : "train/lora_qkv_r8";
    register_kernel_benchmark(name + "/dropout=0", kBatches, bench_lora_train, 0.0f, false,
                              kernels);
    register_kernel_benchmark(name + "/dropout=0.1", kBatches, bench_lora_train, 0.1f, false,
                              kernels);
    register_kernel_benchmark(name + "/dropout=0.1/packed", kBatches, bench_lora_train, 0.1f, true,
                              kernels);
  }
  register_kernel_benchmark("train/cross_entropy/loss", 3, bench_cross_entropy, false);
  register_kernel_benchmark("train/cross_entropy/loss_and_grads", 3, bench_cross_entropy, true);
  return true;
}();

}  // namespace
}  // namespace qg::bench
