// LoRA training step of ChatGLM-6B shapes on one GPU (train/cuda_model_grad.h): random fp16
// weights (28 layers, hidden 4096, vocab 130528), a micro-batch of 4 sequences x 512 tokens
// packed, LoRA r 8 on query_key_value (MedicalGPT-zh's setting), with and without activation
// checkpointing (first argument), and variants of the step (second argument, bits: 1 =
// CudaGradOptions::lora_in_gemm, the LoRA forward term inside the base GEMM; 2 =
// lora_tensor_cores, the LoRA passes on tensor cores; 4 = last_layer_labelled_rows, the last
// layer after its attention on the labelled rows only; 8 = rotary_in_attention_backward, the
// rotary's backward inside the attention backward). Reports tokens/s of forward + backward
// (GPU work alone, and with the LoRA gradients copied back to the host as qg-train does), the
// memory plan and the GPU memory in use after the step, and the step again with the attention
// forward's wide tiles (cuda/attention_paths.h). QG_CUDA_PDL=1 times chained launches.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_report.h"
#include "cuda/attention_paths.h"
#include "qinggeng/model/random_init.h"
#include "qinggeng/train/cuda_model_grad.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kSequences = 4;
constexpr int kTokens = 512;

// 4 examples: 200 prompt tokens, [gMASK] <sop>, 309 answer tokens, <eop>.
std::vector<qg::train::TrainingExample> examples(const qg::io::ModelConfig& c) {
  std::vector<qg::train::TrainingExample> out;
  for (int k = 0; k < kSequences; ++k) {
    qg::train::TrainingExample e;
    for (int i = 0; i < 200; ++i) e.input_ids.push_back(5 + (i * 7919 + k * 104729) % 120000);
    e.mask_position = static_cast<int>(e.input_ids.size());
    e.input_ids.push_back(c.gmask_token_id);
    e.context_length = static_cast<int>(e.input_ids.size());
    e.input_ids.push_back(c.bos_token_id);
    while (static_cast<int>(e.input_ids.size()) < kTokens - 1) {
      e.input_ids.push_back(5 + (static_cast<int>(e.input_ids.size()) * 31 + k) % 120000);
    }
    e.input_ids.push_back(c.eos_token_id);
    for (int t = 0; t < e.size(); ++t) {
      e.labels.push_back(t > e.context_length ? e.input_ids[static_cast<std::size_t>(t)]
                                              : qg::train::kIgnoreLabel);
    }
    out.push_back(std::move(e));
  }
  return out;
}

double used_gib() {
  std::size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  return static_cast<double>(total - free_bytes) / (1024.0 * 1024 * 1024);
}

void BM_TrainStepLora(benchmark::State& state) {
  const bool checkpoint = state.range(0) != 0;
  const bool lora_in_gemm = (state.range(1) & 1) != 0;
  const bool lora_tensor_cores = (state.range(1) & 2) != 0;
  const bool labelled_rows = (state.range(1) & 4) != 0;
  const bool fused_rotary = (state.range(1) & 8) != 0;
  const qg::io::ModelConfig c;  // the defaults are ChatGLM-6B's
  qg::lora::LoraConfig lc;
  lc.r = 8;
  lc.lora_alpha = 16;
  lc.lora_dropout = 0.1;
  lc.targets = {qg::lora::LoraTarget::QueryKeyValue};
  qg::lora::LoraAdapter adapter(lc, c);
  for (int l = 0; l < c.num_layers; ++l) {
    const auto [in, out] = qg::lora::target_features(lc.targets[0], c);
    adapter.set(l, lc.targets[0], std::vector<float>(static_cast<std::size_t>(8 * in), 0.01f),
                std::vector<float>(static_cast<std::size_t>(out * 8), 0.0f));
  }
  qg::train::CudaGradOptions options;
  options.checkpoint_layers = checkpoint;
  options.lora_in_gemm = lora_in_gemm;
  options.lora_tensor_cores = lora_tensor_cores;
  options.last_layer_labelled_rows = labelled_rows;
  options.rotary_in_attention_backward = fused_rotary;
  const auto t0 = Clock::now();
  qg::model::RandomModelOptions weights;
  weights.dtype = qg::DType::F16;
  auto grad = std::make_unique<qg::train::CudaModelGrad>(
      c, qg::model::random_weight_source(c, weights), adapter, 0, options);
  std::fprintf(stderr, "random 6B model for training on the GPU in %.1f s\n",
               std::chrono::duration<double>(Clock::now() - t0).count());
  const auto data = examples(c);
  std::vector<const qg::train::TrainingExample*> batch;
  double scored = 0;
  for (const auto& e : data) {
    batch.push_back(&e);
    scored += e.scored_tokens();
  }
  grad->reserve(kSequences * kTokens);
  grad->benchmark_step(batch, 1024.0f);  // warm-up
  std::vector<double> gpu_ms, full_ms;
  for (auto _ : state) {
    auto t = Clock::now();
    grad->benchmark_step(batch, 1024.0f);
    gpu_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    t = Clock::now();
    benchmark::DoNotOptimize(grad->loss_and_grad(batch, {1, 2, 3, 4}, scored, 1024.0f));
    full_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    state.SetIterationTime(gpu_ms.back() / 1e3);
  }
  // The same step with the attention forward's wide tiles (cuda/attention_paths.h).
  std::vector<double> wide_ms;
  qg::cuda::force_attention_prefill(qg::cuda::AttentionPrefillTiles::Wide);
  grad->benchmark_step(batch, 1024.0f);  // warm-up
  for (int i = 0; i < 5; ++i) {
    const auto t = Clock::now();
    grad->benchmark_step(batch, 1024.0f);
    wide_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
  }
  qg::cuda::force_attention_prefill(qg::cuda::AttentionPrefillTiles::Auto);
  const double tokens = kSequences * kTokens;
  const double ms = qg::bench::median(gpu_ms), with_copy = qg::bench::median(full_ms);
  const double wide = qg::bench::median(wide_ms);
  state.counters["tokens_per_s"] = tokens / (ms / 1e3);
  state.counters["wide_attention_ms"] = wide;
  const std::string plan = grad->memory_plan(kSequences * kTokens).to_string();
  std::fprintf(stderr, "memory plan (%s): %s\n", checkpoint ? "checkpointing" : "no checkpointing",
               plan.c_str());
  // 6B LoRA step: forward 2 x 6.2e9 x tokens, input gradients the same again, plus the
  // recomputed forward of the layers with checkpointing.
  const double flops = (checkpoint ? 3.0 : 2.0) * 2.0 * 6.2e9 * tokens;
  qg::bench::table_row(
      "LoRA train step (ChatGLM-6B shapes, 4 x 512 tokens, r 8 on query_key_value)",
      {"checkpointing", "LoRA forward term", "LoRA passes", "last layer rows", "rotary backward",
       "ms / step", "tokens / s", "with grad copy: tokens / s", "wide attention forward: ms / step",
       "TFLOP/s (model)", "GPU GiB used", "memory plan"},
      {checkpoint ? "yes" : "no", lora_in_gemm ? "in the GEMM" : "own pass",
       lora_tensor_cores ? "tensor cores" : "SIMT", labelled_rows ? "labelled" : "all",
       fused_rotary ? "in the attention" : "own pass", qg::bench::cell(ms, 1),
       qg::bench::cell(tokens / (ms / 1e3), 0), qg::bench::cell(tokens / (with_copy / 1e3), 0),
       qg::bench::cell(wide, 1), qg::bench::cell(flops / (ms / 1e3) / 1e12, 0),
       qg::bench::cell(used_gib(), 1), plan});
}

BENCHMARK(BM_TrainStepLora)
    ->ArgsProduct({{0, 1}, {0, 1, 2, 3, 7, 15}})
    ->Iterations(5)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
