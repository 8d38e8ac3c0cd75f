// Attention benchmarks at ChatGLM-6B's shape (32 heads x 128): prefill tokens/s and TFLOP/s for
// one sequence, decode microseconds per step and GB/s of KV cache read, next to the device's
// device-to-device copy bandwidth measured in the same run. Each timed call starts with a cold
// L2 (a 256 MB buffer is rewritten before it), as in a real forward pass where the layer's
// weights have evicted the cache. Times come from CUDA events around the kernels alone: the
// stream is held at a host gate until every launch of the call is queued, so host launch
// overhead (which CUDA graphs remove in the engine) is not counted.
#include "qinggeng/cuda/attention.h"

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <memory>
#include <vector>

#include "cuda/attention_paths.h"
#include "cuda/check.h"
#include "qinggeng/cuda/kv_pool.h"

namespace {

constexpr int kHeads = 32, kHeadDim = 128, kHidden = kHeads * kHeadDim, kBlockSize = 16;
constexpr std::size_t kFlushBytes = std::size_t{256} << 20;

/// Device memory freed on scope exit.
template <typename T>
std::shared_ptr<T> device_array(std::size_t count) {
  T* p = nullptr;
  QG_CUDA_CHECK(cudaMalloc(&p, count * sizeof(T)));
  QG_CUDA_CHECK(cudaMemset(p, 0, count * sizeof(T)));
  return std::shared_ptr<T>(p, [](T* q) { cudaFree(q); });
}

/// Times `run` once per benchmark iteration with CUDA events, after evicting L2; returns the
/// mean seconds per call (rates are computed from it, not from host timers).
template <typename Run>
double time_kernels(benchmark::State& state, Run run, bool cold_l2 = true) {
  double total = 0;
  auto flush = device_array<char>(kFlushBytes);
  cudaStream_t stream;
  cudaEvent_t start, stop;
  QG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  QG_CUDA_CHECK(cudaEventCreate(&start));
  QG_CUDA_CHECK(cudaEventCreate(&stop));
  run(stream);  // warm-up (first launch loads the module)
  std::atomic<bool> gate{false};
  const auto wait_for_gate = [](void* g) {
    while (!static_cast<std::atomic<bool>*>(g)->load()) {
    }
  };
  for (auto _ : state) {
    gate = false;
    if (cold_l2) {
      QG_CUDA_CHECK(cudaMemsetAsync(flush.get(), state.iterations() & 0xff, kFlushBytes, stream));
    }
    QG_CUDA_CHECK(cudaLaunchHostFunc(stream, wait_for_gate, &gate));
    QG_CUDA_CHECK(cudaEventRecord(start, stream));
    run(stream);
    QG_CUDA_CHECK(cudaEventRecord(stop, stream));
    gate = true;
    QG_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    QG_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms / 1e3);
    total += ms / 1e3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  return total / static_cast<double>(state.iterations());
}

int device_sms() {
  int dev = 0, sms = 0;
  QG_CUDA_CHECK(cudaGetDevice(&dev));
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

/// A batch of `seqs` sequences with `past` cached tokens and `n` new ones each, ready to run.
struct AttentionSetup {
  AttentionSetup(int seqs, int past, int n, int ctx)
      : pool(qg::cuda::KvPoolShape{1, kHeads, kHeadDim, kBlockSize},
             seqs * ((past + n + kBlockSize - 1) / kBlockSize)),
        tables(static_cast<std::size_t>(seqs)) {
    std::vector<qg::cuda::AttentionSequence> batch;
    for (auto& t : tables) {
      pool.reserve(t, past + n);
      qg::cuda::AttentionSequence s;
      s.past = past;
      s.context_length = ctx;
      for (int i = 0; i < n; ++i) {
        s.positions.push_back(past + i);
        s.block_positions.push_back(0);
      }
      s.block_table = &t;
      batch.push_back(std::move(s));
    }
    b = meta.build(batch, kBlockSize, nullptr);
    const std::size_t rows = static_cast<std::size_t>(seqs) * n;
    qkv = device_array<__half>(rows * 3 * kHidden);
    out = device_array<__half>(rows * kHidden);
    workspace = device_array<float>(
        qg::cuda::attention_decode_workspace_floats(seqs, kHeads, kHeadDim));
    QG_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void run(cudaStream_t stream) {
    qg::cuda::attention_forward(qkv.get(), b, pool.layer(0), out.get(), workspace.get(), sms,
                                stream);
  }

  qg::cuda::KvBlockPool pool;
  std::vector<std::vector<int>> tables;
  qg::cuda::AttentionMetadata meta;
  qg::cuda::AttentionBatch b;
  std::shared_ptr<__half> qkv, out;
  std::shared_ptr<float> workspace;
  int sms = device_sms();
};

// ---- benchmarks ----

/// Prefill of one sequence: range(0) tokens; range(1) = 1 for a full GLM prefix (every query
/// sees every key), 0 for a causal mask (half the tiles skipped); range(2) the prefill kernel's
/// tile configuration (cuda/attention_paths.h): 0 narrow, 1 wide.
void BM_AttentionPrefill(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const bool prefix = state.range(1) != 0;
  qg::cuda::force_attention_prefill(state.range(2) != 0 ? qg::cuda::AttentionPrefillTiles::Wide
                                                        : qg::cuda::AttentionPrefillTiles::Narrow);
  AttentionSetup setup(1, 0, n, prefix ? n : 0);
  const double seconds = time_kernels(state, [&](cudaStream_t s) { setup.run(s); });
  qg::cuda::force_attention_prefill(qg::cuda::AttentionPrefillTiles::Auto);
  const double pairs = prefix ? double(n) * n : double(n) * (n + 1) / 2;
  state.counters["tokens/s"] = n / seconds;
  state.counters["TFLOP/s"] = 4.0 * kHeadDim * kHeads * pairs / seconds / 1e12;
}
BENCHMARK(BM_AttentionPrefill)
    ->ArgsProduct({{512, 1024, 2048}, {1, 0}, {0, 1}})
    ->ArgNames({"tokens", "prefix", "wide"})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// One decode step: range(0) sequences, each with range(1) cached tokens. GB/s counts the K and
/// V bytes the step must read.
void BM_AttentionDecode(benchmark::State& state) {
  const int seqs = static_cast<int>(state.range(0)), past = static_cast<int>(state.range(1));
  AttentionSetup setup(seqs, past, 1, past / 2);
  const double seconds =
      time_kernels(state, [&](cudaStream_t s) { setup.run(s); }, state.range(2) != 0);
  const double kv_bytes = 2.0 * seqs * (past + 1) * kHidden * sizeof(__half);
  state.counters["us/step"] = seconds * 1e6;
  state.counters["KV_GB/s"] = kv_bytes / seconds / 1e9;
}
BENCHMARK(BM_AttentionDecode)
    ->ArgsProduct({{1, 4, 16, 64}, {128, 1024}, {1, 0}})
    ->ArgNames({"batch", "context", "cold_l2"})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// The reference: cudaMemcpy device-to-device of 512 MB; GB/s counts bytes read plus written.
void BM_DeviceCopy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{512} << 20;
  auto src = device_array<char>(bytes), dst = device_array<char>(bytes);
  const double seconds = time_kernels(state, [&](cudaStream_t s) {
    QG_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, s));
  });
  state.counters["GB/s"] = 2.0 * bytes / seconds / 1e9;
}
BENCHMARK(BM_DeviceCopy)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// The timing floor: two events with nothing between them, after the L2 flush.
void BM_EventFloor(benchmark::State& state) {
  const double seconds = time_kernels(state, [](cudaStream_t) {});
  state.counters["us"] = seconds * 1e6;
}
BENCHMARK(BM_EventFloor)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
