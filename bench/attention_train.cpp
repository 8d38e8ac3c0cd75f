// Training attention benchmarks at ChatGLM-6B's shape (32 heads x 128): attention_train_forward
// and attention_train_backward (D = rowsum(dout * out) pass + key-block kernel) over packed
// batches of equal sequences with the GLM prefix = half of each sequence, plus the in-place
// rotary; two more tables time the backward's tile configurations and dq reductions and the
// forward's tile configurations (cuda/attention_paths.h). TFLOP/s counts only the visible
// (unmasked) query-key pairs: forward 2 matmuls (4 * head_dim flops per pair and head), backward 5
// (S, dP, dV, dK, dQ: 10 * head_dim); the kernels also compute the masked part of the tiles on the
// mask's edge, which is not counted.
#include "qinggeng/cuda/attention_train.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "bench_report.h"
#include "cuda/attention_paths.h"

namespace qg::bench {
namespace {

constexpr int kHeads = 32, kHeadDim = 128, kHidden = kHeads * kHeadDim;
constexpr int kBatches = 10;
constexpr int kReps = 10;

/// Device int32 array freed on destruction.
struct DeviceInts {
  explicit DeviceInts(const std::vector<int>& host) {
    check_cuda(cudaMalloc(&data, host.size() * sizeof(int)), "cudaMalloc");
    check_cuda(cudaMemcpy(data, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice),
               "cudaMemcpy");
  }
  ~DeviceInts() { cudaFree(data); }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  int* data = nullptr;
};

void bench_attention_train(benchmark::State& state, int seqs, int length) {
  const int T = seqs * length, ctx = length / 2;
  std::vector<int> row_start{0}, context(static_cast<std::size_t>(seqs), ctx), positions, block_positions;
  double pairs = 0;  // visible (query, key) pairs of the batch
  for (int s = 0; s < seqs; ++s) {
    row_start.push_back(row_start.back() + length);
    for (int i = 0; i < length; ++i) {
      pairs += std::max(ctx, i + 1);
      positions.push_back(i < ctx ? i : ctx - 1);
      block_positions.push_back(i < ctx ? 0 : i - ctx + 1);
    }
  }
  DeviceInts d_row_start(row_start), d_ctx(context), d_pos(positions), d_bpos(block_positions);
  cuda::TrainAttentionBatch b;
  b.num_seqs = seqs;
  b.total_tokens = T;
  b.max_seq_len = length;
  b.row_start = d_row_start.data;
  b.context_length = d_ctx.data;

  RandomHalfBuffer qkv(static_cast<std::size_t>(T) * 3 * kHidden, 1.0f),
      out(static_cast<std::size_t>(T) * kHidden, 1.0f), dout(static_cast<std::size_t>(T) * kHidden, 1.0f),
      dqkv(static_cast<std::size_t>(T) * 3 * kHidden, 1.0f);
  float* lse = nullptr;
  void* workspace = nullptr;
  const std::size_t ws_bytes = cuda::attention_train_backward_workspace_bytes(T, kHeads, kHeadDim);
  check_cuda(cudaMalloc(&lse, static_cast<std::size_t>(T) * kHeads * sizeof(float)), "cudaMalloc");
  check_cuda(cudaMalloc(&workspace, ws_bytes), "cudaMalloc");
  const auto h = [](const RandomHalfBuffer& buf) { return reinterpret_cast<__half*>(buf.data()); };

  auto forward = [&](int) {
    cuda::attention_train_forward(h(qkv), b, kHeads, kHeadDim, h(out), lse, nullptr);
  };
  auto backward = [&](int) {
    cuda::attention_train_backward(h(qkv), h(out), lse, h(dout), b, kHeads, kHeadDim, h(dqkv),
                                   workspace, ws_bytes, nullptr);
  };
  // With the rotary's backward (the inverse rotation of dq and dk) fused in.
  auto backward_rotary = [&](int) {
    cuda::attention_train_backward(h(qkv), h(out), lse, h(dout), b, kHeads, kHeadDim, h(dqkv),
                                   workspace, ws_bytes, nullptr, {d_pos.data, d_bpos.data});
  };
  // Rotary forward then inverse (leaves qkv as it was, up to rounding): two launches.
  auto rotary = [&](int) {
    cuda::glm_rotary_qkv(h(qkv), T, kHeads, kHeadDim, d_pos.data, d_bpos.data, false, nullptr);
    cuda::glm_rotary_qkv(h(qkv), T, kHeads, kHeadDim, d_pos.data, d_bpos.data, true, nullptr);
  };
  time_ms(forward, 2, nullptr);  // warm-up: module load, shared-memory opt-in
  time_ms(backward, 2, nullptr);
  std::vector<double> fwd_ms, bwd_ms, rot_ms;
  for (auto _ : state) {
    fwd_ms.push_back(time_ms(forward, kReps, nullptr));
    bwd_ms.push_back(time_ms(backward, kReps, nullptr));
    rot_ms.push_back(time_ms(rotary, kReps, nullptr) / 2);
    state.SetIterationTime((fwd_ms.back() + bwd_ms.back()) * 1e-3);
  }
  // The backward's variants, each pinned in turn (Auto + TileCounters is the row above).
  struct Variant {
    cuda::AttentionBackwardTiles tiles;
    cuda::AttentionBackwardDq dq;
    bool rotary;
    const char* tiles_name;
    const char* dq_name;
  };
  const Variant variants[] = {
      {cuda::AttentionBackwardTiles::Auto, cuda::AttentionBackwardDq::TileCounters, false, "auto",
       "tile counters"},
      {cuda::AttentionBackwardTiles::Auto, cuda::AttentionBackwardDq::TileCounters, true, "auto",
       "tile counters, inverse rotary fused in"},
      {cuda::AttentionBackwardTiles::Auto, cuda::AttentionBackwardDq::SeparatePass, false, "auto",
       "separate pass"},
      {cuda::AttentionBackwardTiles::Narrow, cuda::AttentionBackwardDq::TileCounters, false,
       "narrow (64 keys x 32 queries)", "tile counters"},
      {cuda::AttentionBackwardTiles::Narrow, cuda::AttentionBackwardDq::SeparatePass, false,
       "narrow (64 keys x 32 queries)", "separate pass"}};
  // Median of 5 timings of `run` after a warm-up.
  const auto median_ms = [](const auto& run) {
    time_ms(run, 2, nullptr);
    std::vector<double> ms;
    for (int i = 0; i < 5; ++i) ms.push_back(time_ms(run, kReps, nullptr));
    return median(ms);
  };
  for (const Variant& v : variants) {
    cuda::force_attention_train_backward(v.tiles, v.dq);
    const double m = median_ms([&](int i) { v.rotary ? backward_rotary(i) : backward(i); });
    table_row("Training attention backward variants (32 heads x 128, GLM prefix = half)",
              {"batch, tiles, dq reduction", "backward ms", "backward TFLOP/s"},
              {std::to_string(seqs) + " x " + std::to_string(length) + ", " + v.tiles_name + ", " +
                   v.dq_name,
               cell(m, 3), cell(10.0 * kHeadDim * kHeads * pairs / (m * 1e-3) / 1e12, 1)});
  }
  cuda::force_attention_train_backward(cuda::AttentionBackwardTiles::Auto,
                                       cuda::AttentionBackwardDq::TileCounters);
  // The forward's tile configurations (cuda/attention_paths.h), each pinned in turn.
  for (const auto tiles :
       {cuda::AttentionPrefillTiles::Narrow, cuda::AttentionPrefillTiles::Wide}) {
    cuda::force_attention_prefill(tiles);
    const double m = median_ms(forward);
    table_row("Training attention forward variants (32 heads x 128, GLM prefix = half)",
              {"batch, tiles", "forward ms", "forward TFLOP/s"},
              {std::to_string(seqs) + " x " + std::to_string(length) + ", " +
                   (tiles == cuda::AttentionPrefillTiles::Wide ? "wide (128 queries, 32 a warp)"
                                                               : "narrow (64 queries, 16 a warp)"),
               cell(m, 3), cell(4.0 * kHeadDim * kHeads * pairs / (m * 1e-3) / 1e12, 1)});
  }
  cuda::force_attention_prefill(cuda::AttentionPrefillTiles::Auto);
  check_cuda(cudaGetLastError(), "benchmark launches");
  cudaFree(lse);
  cudaFree(workspace);
  const double f = median(fwd_ms), bw = median(bwd_ms), r = median(rot_ms);
  const double fwd_tflops = 4.0 * kHeadDim * kHeads * pairs / (f * 1e-3) / 1e12;
  const double bwd_tflops = 10.0 * kHeadDim * kHeads * pairs / (bw * 1e-3) / 1e12;
  state.counters["fwd_ms"] = f;
  state.counters["bwd_ms"] = bw;
  state.counters["bwd/fwd"] = bw / f;
  state.counters["fwd_TFLOPs"] = fwd_tflops;
  state.counters["bwd_TFLOPs"] = bwd_tflops;
  table_row("Training attention (32 heads x 128, GLM prefix = half; TFLOP/s of the visible "
            "pairs only)",
            {"batch", "forward ms", "forward TFLOP/s", "backward ms", "backward TFLOP/s",
             "backward / forward", "rotary ms (one direction)", "% of cuBLAS fp16 peak (bwd)"},
            {std::to_string(seqs) + " x " + std::to_string(length), cell(f, 3), cell(fwd_tflops, 1),
             cell(bw, 3), cell(bwd_tflops, 1), cell(bw / f, 2), cell(r, 3),
             cell(100.0 * bwd_tflops / peaks().cublas_tflops, 0)});
}

const bool registered = [] {
  for (const auto& [seqs, length] : std::vector<std::pair<int, int>>{{4, 512}, {2, 1024}}) {
    register_kernel_benchmark("attention_train/" + std::to_string(seqs) + "x" + std::to_string(length),
                              kBatches, bench_attention_train, seqs, length);
  }
  return true;
}();

}  // namespace
}  // namespace qg::bench
