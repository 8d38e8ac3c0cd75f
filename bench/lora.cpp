// Runtime LoRA benchmarks: qg::cuda::lora_add_f16 on ChatGLM-6B's query_key_value (in 4096,
// out 12288, r 8) for 1 and 4 adapters in the batch (4: contiguous runs of rows, one per
// sequence), as a fraction of the base qg::cuda::gemm_f16 of the same shape that it follows.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/lora.h"
#include "qinggeng/error.h"

namespace qg::bench {
namespace {

constexpr std::int64_t kIn = 4096, kOut = 12288, kRank = 8;
constexpr int kCapacity = 4;
constexpr int kBatches = 15;
constexpr int kReps = 20;

io::ModelConfig one_layer_model() {
  io::ModelConfig m;
  m.hidden_size = kIn;
  m.num_layers = 1;
  return m;
}

/// The stack with kCapacity random rank-8 adapters, built once.
cuda::GpuLoraStack& stack() {
  static auto built = [] {
    const io::ModelConfig model = one_layer_model();
    auto s = std::make_unique<cuda::GpuLoraStack>(lora::LoraTarget::QueryKeyValue, model,
                                                  kCapacity, static_cast<int>(kRank));
    lora::LoraConfig config;
    config.r = kRank;
    config.lora_alpha = 16;
    config.targets = {lora::LoraTarget::QueryKeyValue};
    for (int id = 0; id < kCapacity; ++id) {
      lora::LoraAdapter adapter(config, model);
      std::vector<float> a(static_cast<std::size_t>(kRank * kIn)), b(static_cast<std::size_t>(kOut * kRank));
      for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.01f * static_cast<float>((i * 7 + id) % 13) - 0.06f;
      for (std::size_t i = 0; i < b.size(); ++i) b[i] = 0.01f * static_cast<float>((i * 5 + id) % 11) - 0.05f;
      adapter.set(0, lora::LoraTarget::QueryKeyValue, std::move(a), std::move(b));
      s->load(id, adapter);
    }
    return s;
  }();
  return *built;
}

void bench_lora(benchmark::State& state, std::int64_t T, int adapters) {
  cuda::GpuLoraStack& s = stack();
  const cuda::LoraLayerView view = s.layer(0);
  RandomHalfBuffer x(static_cast<std::size_t>(T * kIn), 1.0f), w(static_cast<std::size_t>(kOut * kIn), 0.03f),
      y(static_cast<std::size_t>(T * kOut), 1.0f);
  std::vector<std::int32_t> host_ids(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t)
    host_ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t * adapters / T);
  cuda::check_adapter_rows(s, host_ids);
  std::int32_t* ids = nullptr;
  void* workspace = nullptr;
  const std::size_t bytes = cuda::lora_add_workspace_bytes(view, T);
  check_cuda(cudaMalloc(&ids, host_ids.size() * 4), "cudaMalloc");
  check_cuda(cudaMalloc(&workspace, bytes), "cudaMalloc");
  check_cuda(cudaMemcpy(ids, host_ids.data(), host_ids.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  auto add = [&](int) {
    cuda::lora_add_f16(view, x.data(), y.data(), T, ids, workspace, bytes, nullptr);
  };
  auto base = [&](int) {
    cuda::gemm_f16(x.data(), w.data(), y.data(), false, T, kOut, kIn, cuda::GemmEpilogue{}, nullptr);
  };
  time_ms(add, 3, nullptr);
  time_ms(base, 3, nullptr);
  std::vector<double> add_ms, base_ms;
  for (auto _ : state) {
    const double t = time_ms(add, kReps, nullptr);
    add_ms.push_back(t);
    base_ms.push_back(time_ms(base, kReps, nullptr));
    state.SetIterationTime(t * 1e-3);
  }
  check_cuda(cudaGetLastError(), "benchmark launches");
  cudaFree(ids);
  cudaFree(workspace);
  const double t = median(add_ms), b = median(base_ms);
  // Bytes the add must move at least: x read, y read and written, the factors once.
  const double min_bytes = 2.0 * (T * kIn + 2.0 * T * kOut + adapters * kRank * (kIn + kOut));
  const double gbps = min_bytes / (t * 1e-3) / 1e9;
  state.counters["us"] = t * 1e3;
  state.counters["base_gemm_us"] = b * 1e3;
  state.counters["pct_of_base"] = 100.0 * t / b;
  state.counters["GBps"] = gbps;
  table_row("LoRA add (qkv: in 4096, out 12288, r 8) vs the base gemm_f16 of the same shape",
            {"T, adapters", "LoRA add us", "base gemm us", "LoRA / base %", "LoRA GB/s (min bytes)",
             "% of copy BW"},
            {"T=" + std::to_string(T) + ", " + std::to_string(adapters), cell(t * 1e3, 1),
             cell(b * 1e3, 1), cell(100.0 * t / b, 1), cell(gbps, 0),
             cell(100.0 * gbps / peaks().copy_gbps, 0)});
}

const bool registered = [] {
  for (std::int64_t T : {1, 16, 512, 2048}) {
    for (int adapters : {1, 4}) {
      const std::string name = "lora/qkv_r8/T=" + std::to_string(T) + "/adapters=" + std::to_string(adapters);
      register_kernel_benchmark(name, kBatches, bench_lora, T, adapters);
    }
  }
  return true;
}();

}  // namespace
}  // namespace qg::bench
