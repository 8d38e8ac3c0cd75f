// Quantized decode GEMM benchmarks: qg::cuda::quant_gemm with int8 per-channel and int4
// group-128 weights against gemm_f16 (its skinny decode path) on the same fp16 weights, for
// ChatGLM-6B's linear layers at M = 1, 4, 16 tokens. Decode is bound by weight bytes, so the
// table reports the quantized bytes (values + scales) per second and their share of the copy
// bandwidth. Both sides rotate over enough weight copies that L2 never holds them; a second
// table gives the one-off cost of quantize_weight at load time.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/quant_gemm.h"
#include "qinggeng/error.h"

namespace qg::bench {
namespace {

using Scheme = cuda::QuantizedWeight::Scheme;

constexpr std::int64_t kDecodeTokens[] = {1, 4, 16};
constexpr int kTimedBatches = 15;
constexpr int kLaunchesPerBatch = 10;
constexpr double kRotateBytes = 3.0 * 50e6;  // three times H100's L2

int copies_for(double bytes) {
  return bytes >= kRotateBytes ? 1 : static_cast<int>(kRotateBytes / bytes) + 1;
}

/// fp16 and quantized copies of one layer's weight, kept while benchmarks use that layer.
struct QuantWorkspace {
  std::int64_t N = 0, K = 0;
  Scheme scheme = Scheme::Int8PerChannel;
  std::vector<std::unique_ptr<RandomHalfBuffer>> fp16, data, scales;
  std::vector<cuda::QuantizedWeight> quantized;
  std::unique_ptr<RandomHalfBuffer> x, y;
  double quantize_ms = 0;
  std::size_t quantized_bytes = 0;
};

QuantWorkspace& workspace_for(const LinearShape& layer, Scheme scheme) {
  static QuantWorkspace ws;
  if (ws.N == layer.N && ws.K == layer.K && ws.scheme == scheme) return ws;
  ws = QuantWorkspace{};
  ws.N = layer.N;
  ws.K = layer.K;
  ws.scheme = scheme;
  const auto elements = static_cast<std::size_t>(layer.N * layer.K);
  const std::size_t data_bytes = tensor::quant_data_bytes(scheme, layer.N, layer.K);
  const std::size_t scale_count = tensor::quant_scale_count(scheme, layer.N, layer.K);
  ws.quantized_bytes = data_bytes + 2 * scale_count;
  for (int c = 0; c < copies_for(2.0 * static_cast<double>(elements)); ++c) {
    ws.fp16.push_back(std::make_unique<RandomHalfBuffer>(elements, 0.03f));
  }
  for (int c = 0; c < copies_for(static_cast<double>(ws.quantized_bytes)); ++c) {
    ws.data.push_back(std::make_unique<RandomHalfBuffer>(data_bytes / 2, 1.0f));
    ws.scales.push_back(std::make_unique<RandomHalfBuffer>(scale_count, 1.0f));
    const auto start = std::chrono::steady_clock::now();
    ws.quantized.push_back(cuda::quantize_weight(ws.fp16[0]->data(), scheme, layer.N, layer.K,
                                                 ws.data[c]->data(), ws.scales[c]->data(),
                                                 layer.name, nullptr));
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    if (c == 1 || ws.quantize_ms == 0) ws.quantize_ms = took.count();  // skip the cold first call
  }
  const auto max_tokens = static_cast<std::size_t>(kDecodeTokens[std::size(kDecodeTokens) - 1]);
  ws.x = std::make_unique<RandomHalfBuffer>(max_tokens * layer.K, 1.0f);
  ws.y = std::make_unique<RandomHalfBuffer>(max_tokens * layer.N, 1.0f);
  return ws;
}

void bench_quant_linear(benchmark::State& state, LinearShape layer, Scheme scheme,
                        std::int64_t M) {
  QuantWorkspace& ws = workspace_for(layer, scheme);
  const int qcopies = static_cast<int>(ws.quantized.size());
  const int fcopies = static_cast<int>(ws.fp16.size());
  auto quant = [&](int i) {
    cuda::quant_gemm(ws.x->data(), ws.quantized[i % qcopies], ws.y->data(), false, M,
                     cuda::GemmEpilogue{}, nullptr);
  };
  auto fp16 = [&](int i) {
    cuda::gemm_f16(ws.x->data(), ws.fp16[i % fcopies]->data(), ws.y->data(), false, M, layer.N,
                   layer.K, cuda::GemmEpilogue{}, nullptr);
  };
  time_ms(quant, 2 * qcopies, nullptr);  // warm-up
  time_ms(fp16, 2 * fcopies, nullptr);
  std::vector<double> quant_ms, fp16_ms;
  for (auto _ : state) {
    const double t = time_ms(quant, kLaunchesPerBatch, nullptr);
    quant_ms.push_back(t);
    fp16_ms.push_back(time_ms(fp16, kLaunchesPerBatch, nullptr));
    state.SetIterationTime(t * 1e-3);
  }
  check_cuda(cudaGetLastError(), "benchmark launches");
  const double t = median(quant_ms), f = median(fp16_ms);
  const double gbps = static_cast<double>(ws.quantized_bytes) / (t * 1e-3) / 1e9;
  const double pct_copy = 100.0 * gbps / peaks().copy_gbps;
  state.counters["us"] = t * 1e3;
  state.counters["fp16_us"] = f * 1e3;
  state.counters["speedup"] = f / t;
  state.counters["weight_GBps"] = gbps;
  state.counters["pct_copy_bw"] = pct_copy;
  const std::string scheme_name(tensor::quant_scheme_name(scheme));
  table_row("Quantized decode GEMM: qg::cuda::quant_gemm vs gemm_f16 skinny (fp16 X/Y, no "
            "epilogue)",
            {"layer, M, scheme", "N", "K", "weight MB", "quant us", "fp16 us", "speedup",
             "quant weight GB/s", "% of copy BW"},
            {std::string(layer.name) + ", M=" + std::to_string(M) + ", " + scheme_name,
             std::to_string(layer.N), std::to_string(layer.K),
             cell(static_cast<double>(ws.quantized_bytes) / 1e6, 1), cell(t * 1e3, 1),
             cell(f * 1e3, 1), cell(f / t, 2), cell(gbps, 0), cell(pct_copy, 0)});
  table_row("quantize_weight at load time (fp16 -> quantized, includes its synchronize)",
            {"layer, scheme", "N", "K", "ms"},
            {std::string(layer.name) + ", " + scheme_name, std::to_string(layer.N),
             std::to_string(layer.K), cell(ws.quantize_ms, 2)});
}

const bool registered = [] {
  for (const LinearShape& layer : kChatGlmLinears) {
    for (Scheme scheme : {Scheme::Int8PerChannel, Scheme::Int4Group128}) {
      for (std::int64_t M : kDecodeTokens) {
        const std::string name = std::string("quant_gemm/") + layer.name + "/" +
                                 (scheme == Scheme::Int8PerChannel ? "int8" : "int4") +
                                 "/M=" + std::to_string(M);
        register_kernel_benchmark(name, kTimedBatches, bench_quant_linear, layer, scheme, M);
      }
    }
  }
  return true;
}();

}  // namespace
}  // namespace qg::bench
