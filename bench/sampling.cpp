// Sampling benchmarks at ChatGLM-6B's vocabulary (130528): microseconds per decode step for a
// batch of rows, greedy, with the reference chat settings (top_p 0.7, temperature 0.95,
// repetition penalty 1.1 over a 100-token history) and with top_k 40 added. "1-block" times
// sample_tokens() without a workspace (one block per row, the old form), "split" with one
// (several blocks per row, what GpuSampler runs), both on rows already on the device (what a
// captured CUDA graph replays); "GpuSampler" times the whole sample() call: validation, the
// ~48-byte-per-row settings upload and the launches. Logits are normal with sigma 2.5 (a
// flatter distribution than a trained model's: more tokens survive top-p, so this is the
// harder case); 20 back-to-back steps between two events.
#include "qinggeng/cuda/sampling.h"

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_report.h"
#include "cuda/check.h"

namespace {

constexpr int kVocab = 130528, kHistory = 100, kReps = 20;

template <typename T>
std::shared_ptr<T> upload(const std::vector<T>& host) {
  T* p = nullptr;
  QG_CUDA_CHECK(cudaMalloc(&p, host.size() * sizeof(T)));
  QG_CUDA_CHECK(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return std::shared_ptr<T>(p, [](T* q) { cudaFree(q); });
}

qg::engine::SamplingConfig chat_config(bool sample) {
  qg::engine::SamplingConfig c;
  c.do_sample = sample;
  c.temperature = 0.95f;
  c.top_p = 0.7f;
  c.repetition_penalty = 1.1f;
  return c;
}

/// Median microseconds per step over `rounds` rounds of kReps steps; `before` runs untimed
/// ahead of each round.
template <typename Step, typename Before>
double step_us(Step step, Before before, cudaStream_t stream, int rounds = 7) {
  std::vector<double> ms;
  before();
  step(0);  // warm-up
  for (int r = 0; r < rounds; ++r) {
    before();
    ms.push_back(qg::bench::time_ms(step, kReps, stream));
  }
  return qg::bench::median(ms) * 1e3;
}

/// range(0) rows; reports every variant, the iteration time is GpuSampler with top-p.
void BM_Sampling(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 2.5f);
  std::uniform_int_distribution<int> token(0, kVocab - 1);
  std::vector<float> logits(static_cast<std::size_t>(batch) * kVocab);
  for (float& x : logits) x = normal(rng);
  std::vector<std::vector<int>> prompts(static_cast<std::size_t>(batch));
  std::vector<int> flat_history;
  for (auto& p : prompts) {
    for (int i = 0; i < kHistory; ++i) p.push_back(token(rng));
    flat_history.insert(flat_history.end(), p.begin(), p.end());
  }
  auto d_logits = upload(logits);
  auto d_history = upload(flat_history);
  auto d_out = upload(std::vector<int>(static_cast<std::size_t>(batch), 0));
  cudaStream_t stream;
  QG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  int device = 0, num_sms = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  const std::size_t workspace_bytes = qg::cuda::sampling_workspace_bytes(batch);
  auto d_workspace = upload(std::vector<unsigned char>(workspace_bytes, 0));

  // Kernel only: rows prepared once on the device, no history appends.
  enum Mode { kGreedy, kTopP, kTopK };
  auto kernel_us = [&](Mode mode, bool split) {
    std::vector<qg::cuda::SamplingRow> rows(static_cast<std::size_t>(batch));
    for (int r = 0; r < batch; ++r) {
      auto& row = rows[static_cast<std::size_t>(r)];
      row.temperature = 0.95f;
      row.top_p = 0.7f;
      row.top_k = mode == kTopK ? 40 : 0;
      row.repetition_penalty = 1.1f;
      row.do_sample = mode != kGreedy;
      row.history_begin = r * kHistory;
      row.history_length = kHistory;
      row.seed = static_cast<std::uint64_t>(r);
    }
    auto d_rows = upload(rows);
    return step_us(
        [&](int) {
          if (split) {
            qg::cuda::sample_tokens(d_logits.get(), batch, kVocab, d_rows.get(), d_history.get(),
                                    true, d_out.get(), d_workspace.get(), workspace_bytes, num_sms,
                                    stream);
          } else {
            qg::cuda::sample_tokens(d_logits.get(), batch, kVocab, d_rows.get(), d_history.get(),
                                    true, d_out.get(), stream);
          }
        },
        [] {}, stream);
  };

  // The whole GpuSampler::sample() call with slot histories (reset before each round).
  auto api_us = [&](bool sample) {
    qg::cuda::GpuSampler sampler(batch, kHistory + 2 * kReps);
    const std::vector<qg::engine::SamplingConfig> configs(static_cast<std::size_t>(batch),
                                                          chat_config(sample));
    std::vector<int> slots(static_cast<std::size_t>(batch));
    for (int r = 0; r < batch; ++r) slots[static_cast<std::size_t>(r)] = r;
    std::vector<std::uint64_t> steps(static_cast<std::size_t>(batch), 0);
    return step_us(
        [&](int i) {
          for (auto& s : steps) s = static_cast<std::uint64_t>(i);
          sampler.sample(d_logits.get(), batch, kVocab, configs, slots, steps, d_out.get(), stream);
        },
        [&] {
          for (int r = 0; r < batch; ++r) {
            sampler.reset_history(r, prompts[static_cast<std::size_t>(r)], stream);
          }
        },
        stream);
  };

  const double greedy_one = kernel_us(kGreedy, false), greedy_split = kernel_us(kGreedy, true);
  const double top_p_one = kernel_us(kTopP, false), top_p_split = kernel_us(kTopP, true);
  const double top_k_one = kernel_us(kTopK, false), top_k_split = kernel_us(kTopK, true);
  const double greedy_api = api_us(false), top_p_api = api_us(true);
  for (auto _ : state) state.SetIterationTime(top_p_api * 1e-6);
  state.counters["greedy_1block_us"] = greedy_one;
  state.counters["greedy_split_us"] = greedy_split;
  state.counters["greedy_api_us"] = greedy_api;
  state.counters["top_p_1block_us"] = top_p_one;
  state.counters["top_p_split_us"] = top_p_split;
  state.counters["top_p_api_us"] = top_p_api;
  state.counters["top_k40_1block_us"] = top_k_one;
  state.counters["top_k40_split_us"] = top_k_split;
  qg::bench::table_row(
      "Sampling, vocab 130528: microseconds per step",
      {"batch", "greedy 1-block", "greedy split", "greedy GpuSampler", "top-p 0.7 1-block",
       "top-p 0.7 split", "top-p 0.7 GpuSampler", "top-k 40 + top-p 1-block",
       "top-k 40 + top-p split"},
      {std::to_string(batch), qg::bench::cell(greedy_one, 1), qg::bench::cell(greedy_split, 1),
       qg::bench::cell(greedy_api, 1), qg::bench::cell(top_p_one, 1),
       qg::bench::cell(top_p_split, 1), qg::bench::cell(top_p_api, 1),
       qg::bench::cell(top_k_one, 1), qg::bench::cell(top_k_split, 1)});
  cudaStreamDestroy(stream);
}
BENCHMARK(BM_Sampling)
    ->ArgsProduct({{1, 4, 16, 64}})
    ->ArgNames({"batch"})
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
