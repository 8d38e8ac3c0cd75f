// Measurement and reporting helpers shared by every qg_bench kernel family: device buffers
// filled with random fp16, event timing with a median, the card's measured reference peaks
// (device-to-device copy bandwidth, a large cuBLAS fp16 GEMM), and Markdown tables that
// qg_bench prints after all benchmarks ran.
#pragma once

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace qg::bench {

/// \brief A device allocation filled with random fp16 values in [-scale, scale] (never zeros:
/// zeros can run faster than real data). Freed on destruction.
class RandomHalfBuffer {
 public:
  RandomHalfBuffer(std::size_t elements, float scale);
  ~RandomHalfBuffer();
  RandomHalfBuffer(const RandomHalfBuffer&) = delete;
  RandomHalfBuffer& operator=(const RandomHalfBuffer&) = delete;
  std::uint16_t* data() const { return data_; }
  std::size_t elements() const { return elements_; }

 private:
  std::uint16_t* data_ = nullptr;
  std::size_t elements_ = 0;
};

/// \brief A Linear layer: Y[M, N] = X[M, K] · W[N, K]^T.
struct LinearShape {
  const char* name;
  std::int64_t N, K;
};

/// \brief ChatGLM-6B's linear layers (hidden 4096, ffn 16384, vocab 130528), the shapes every
/// GEMM benchmark runs.
inline constexpr LinearShape kChatGlmLinears[] = {{"qkv", 12288, 4096},
                                                  {"dense", 4096, 4096},
                                                  {"h_to_4h", 16384, 4096},
                                                  {"4h_to_h", 4096, 16384},
                                                  {"lm_head", 130528, 4096}};

/// \brief Throws qg::Error when a CUDA runtime call failed (benchmarks must not time errors).
void check_cuda(cudaError_t status, const char* what);

/// \brief Device time of one call of `fn` in milliseconds: `reps` back-to-back calls between
/// two events on `stream`, divided by reps (fn(i) gets the call index, for buffer rotation).
double time_ms(const std::function<void(int)>& fn, int reps, cudaStream_t stream);

/// \brief The process's cuBLAS handle (the baseline of every GEMM benchmark), made on first use.
cublasHandle_t cublas();

/// \brief Median of `values` (which it reorders).
double median(std::vector<double>& values);

/// \brief Reference ceilings measured once per process on the current device.
struct Peaks {
  double copy_gbps = 0;      ///< device-to-device memcpy, (bytes read + written) / s / 1e9
  double cublas_tflops = 0;  ///< cuBLAS fp16 GEMM 8192^3 with fp32 accumulation
};
/// \brief Measures the peaks on first use (about a second), then returns the cached values.
const Peaks& peaks();

/// \brief Adds (or replaces, by its first cell) a row of Markdown table `table`; all tables
/// are printed when the run ends, in order of first use.
void table_row(const std::string& table, const std::vector<std::string>& header,
               const std::vector<std::string>& row);

/// \brief printf-style "%.*f" of `value` as a table cell.
std::string cell(double value, int decimals);

/// \brief Registers a kernel benchmark the way every family times them: manual (event) time
/// in microseconds over `batches` iterations.
template <typename Fn, typename... Args>
void register_kernel_benchmark(const std::string& name, int batches, Fn fn, Args... args) {
  benchmark::RegisterBenchmark(name.c_str(), fn, args...)
      ->UseManualTime()
      ->Iterations(batches)
      ->Unit(benchmark::kMicrosecond);
}

/// \brief Markdown text of every table collected so far.
std::string markdown_tables();

}  // namespace qg::bench
