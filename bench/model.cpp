// Whole-model benchmarks of the CUDA backend with random ChatGLM-6B-shaped weights (28 layers,
// hidden 4096, vocab 130528, fp16): decode ms/token at batch 1/4/16/64 with prompts of 128 and
// 1024 tokens, prefill tokens/s at 1024 and 2048, and the memory the run held. Decode is also
// expressed as weight bytes read per second against the measured copy bandwidth (the roofline
// of batch-1 decode). Times are wall-clock per call; a decode step is the forward plus greedy
// sampling on the GPU (only token ids reach the host), with the step replayed from a CUDA graph
// or launched op by op (third argument 1 / 0); prefill copies its logits to the host.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "cuda/attention_paths.h"
#include "qinggeng/engine/generator.h"
#include "qinggeng/model/random_init.h"

namespace {

using Clock = std::chrono::steady_clock;

qg::io::ModelConfig chatglm_6b() { return qg::io::ModelConfig{}; }  // the defaults are 6B's

// Weight format of the benchmarked model: QG_BENCH_WEIGHTS=f16 (default), int8 or int4.
std::string weight_format() {
  const char* env = std::getenv("QG_BENCH_WEIGHTS");
  return env ? env : "f16";
}

qg::model::GlmModel& model_6b() {
  static std::unique_ptr<qg::model::GlmModel> model = [] {
    const auto t0 = Clock::now();
    auto m = std::make_unique<qg::model::GlmModel>(qg::model::random_model(
        chatglm_6b(), qg::model::make_backend("cuda", 0, weight_format()), {1, qg::DType::F16, false}));
    std::fprintf(stderr, "random 6B model (%s weights) on the GPU in %.1f s\n", weight_format().c_str(),
                 std::chrono::duration<double>(Clock::now() - t0).count());
    std::fprintf(stderr, "memory plan: %s\n", m->backend().memory_report().c_str());
    return m;
  }();
  return *model;
}

std::vector<int> prompt_ids(int length, int salt) {
  const auto c = chatglm_6b();
  std::vector<int> ids;
  for (int i = 0; i + 2 < length; ++i) ids.push_back(5 + (i * 7919 + salt * 104729) % 120000);
  ids.push_back(c.gmask_token_id);
  ids.push_back(c.bos_token_id);
  return ids;
}

double used_gib() {
  std::size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  return static_cast<double>(total - free_bytes) / (1024.0 * 1024 * 1024);
}

void BM_ModelDecode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int prompt = static_cast<int>(state.range(1));
  const bool graphs = state.range(2) != 0;
  auto& model = model_6b();
  model.backend().set_decode_graphs(graphs);
  const auto& c = model.config();
  std::vector<std::unique_ptr<qg::model::KvCache>> caches;
  std::vector<qg::text::GlmLayout> layouts;
  // Prefill every sequence (untimed), a few at a time to bound activation memory.
  for (int b = 0; b < batch; b += 4) {
    std::vector<qg::model::SequenceChunk> chunks;
    for (int i = b; i < std::min(batch, b + 4); ++i) {
      const auto ids = prompt_ids(prompt, i);
      caches.push_back(model.new_kv_cache(prompt + 64));  // 3 warm-up + 12 timed steps
      layouts.push_back(qg::text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id));
      chunks.push_back(qg::engine::layout_chunk(layouts.back(), *caches.back(), ids, false));
    }
    model.forward(chunks);
  }
  // Greedy sampling on the device: the step's output is `batch` token ids.
  qg::engine::SamplingConfig greedy;
  greedy.do_sample = false;
  const std::vector<qg::engine::SamplingConfig> configs(static_cast<std::size_t>(batch), greedy);
  const std::vector<const std::vector<int>*> histories(static_cast<std::size_t>(batch), nullptr);
  const std::vector<std::uint64_t> steps(static_cast<std::size_t>(batch), 0);
  std::vector<int> next(static_cast<std::size_t>(batch), 100);
  auto decode_step = [&] {
    std::vector<qg::model::SequenceChunk> step;
    for (int i = 0; i < batch; ++i) {
      const auto u = static_cast<std::size_t>(i);
      step.push_back(qg::engine::layout_chunk(layouts[u], *caches[u], {next[u]}, false));
    }
    next = model.backend().sample_tokens(model.forward_logits(step), configs, histories, steps);
  };
  for (int i = 0; i < 3; ++i) decode_step();  // warm-up: a graph is measured and captured here
  std::vector<double> step_ms;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    decode_step();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    state.SetIterationTime(ms / 1e3);
    step_ms.push_back(ms);
  }
  model.backend().set_decode_graphs(true);
  const double ms = qg::bench::median(step_ms);
  const double weight_gbps = static_cast<double>(model.weight_bytes()) / (ms / 1e3) / 1e9;
  // Decode at batch 1 only reads weights, so the copy's bytes moved (read + write) per second
  // is its roofline.
  const double copy_gbps = qg::bench::peaks().copy_gbps;
  state.counters["ms_per_step"] = ms;
  state.counters["tokens_per_s"] = batch / (ms / 1e3);
  state.counters["weight_GBps"] = weight_gbps;
  qg::bench::table_row(
      "Model decode (ChatGLM-6B shapes, random weights, " + weight_format() + ")",
      {"batch x prompt, step launch", "ms / step", "tokens / s", "weight GB/s", "% of copy BW", "GPU GiB used"},
      {std::to_string(batch) + " x " + std::to_string(prompt) + (graphs ? ", CUDA graph" : ", op by op"),
       qg::bench::cell(ms, 2),
       qg::bench::cell(batch / (ms / 1e3), 0), qg::bench::cell(weight_gbps, 0),
       qg::bench::cell(100 * weight_gbps / copy_gbps, 1), qg::bench::cell(used_gib(), 1)});
}

/// Prefill of range(0) tokens; range(1) the attention kernel's tiles (cuda/attention_paths.h):
/// 0 narrow, 1 wide.
void BM_ModelPrefill(benchmark::State& state) {
  const int length = static_cast<int>(state.range(0));
  const bool wide = state.range(1) != 0;
  qg::cuda::force_attention_prefill(wide ? qg::cuda::AttentionPrefillTiles::Wide
                                         : qg::cuda::AttentionPrefillTiles::Narrow);
  auto& model = model_6b();
  const auto& c = model.config();
  const auto ids = prompt_ids(length, 1);
  const auto layout = qg::text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
  std::vector<double> times;
  for (auto _ : state) {
    auto cache = model.new_kv_cache(length);
    const auto t0 = Clock::now();
    benchmark::DoNotOptimize(model.forward({qg::engine::layout_chunk(layout, *cache, ids, false)}));
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms);
  }
  qg::cuda::force_attention_prefill(qg::cuda::AttentionPrefillTiles::Auto);
  const double ms = qg::bench::median(times);
  state.counters["tokens_per_s"] = length / (ms / 1e3);
  const double tflops = 2.0 * 6.2e9 * length / (ms / 1e3) / 1e12;
  qg::bench::table_row("Model prefill (ChatGLM-6B shapes, one sequence, " + weight_format() + ")",
                       {"prompt tokens", "attention tiles", "ms", "tokens / s",
                        "TFLOP/s (2 x 6.2e9 x n)", "GPU GiB used"},
                       {std::to_string(length), wide ? "wide" : "narrow", qg::bench::cell(ms, 2),
                        qg::bench::cell(length / (ms / 1e3), 0), qg::bench::cell(tflops, 0),
                        qg::bench::cell(used_gib(), 1)});
}

BENCHMARK(BM_ModelPrefill)
    ->ArgsProduct({{1024, 2048}, {0, 1}})
    ->Iterations(5)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ModelDecode)
    ->ArgsProduct({{1, 4, 16, 64}, {128, 1024}, {1, 0}})
    ->Iterations(12)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
