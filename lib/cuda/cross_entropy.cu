// Fused vocabulary cross-entropy of a training step (include/qinggeng/cuda/cross_entropy.h).
// Per chunk of rows:
//   1. logits = hidden_c lm_head^T into an fp32 scratch [chunk, vocab] (gemm_f16);
//   2. cross_entropy_rows_kernel, one 512-thread block per row: an online max / sum-exp over
//      the row (one exp per logit), NLL = lse - logit[target], then (backward only) a second
//      pass writing dlogits = (softmax - onehot) * grad_scale / normalizer as fp16 (zeros for
//      ignored rows);
//   3. dhidden_c = dlogits lm_head (gemm_f16_nn) and dlm_head += dlogits^T hidden_c
//      (gemm_f16_tn, fp32 accumulate).
// The backward GEMMs need the vocabulary a multiple of 8 (it is their K, resp. M); a vocabulary
// that is not keeps its last vocab % 8 columns in a small fp32 side buffer instead, and
// vocab_tail_kernel adds their share to dhidden and dlm_head. Only row_chunk x vocab logits
// exist at a time (fp32, plus their fp16 gradient).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kIgnoreLabel = -100;  // train/dataset.h's kIgnoreLabel
constexpr int kTailWidth = 8;       // row stride of the tail buffer (vocab % 8 < 8 columns)
constexpr int kTailThreads = 128;

std::size_t align256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

/// The vocabulary the backward GEMMs cover: vocab rounded down to a multiple of 8.
std::int64_t gemm_vocab(std::int64_t vocab) { return vocab / 8 * 8; }

// ---- CUDA kernels ----

/// Merges a (max, sum of exp(value - max)) pair into (m, s); s == 0 marks an empty pair.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float other_m, float other_s) {
  if (other_s == 0.0f) return;
  if (other_m > m) {
    s = s * expf(m - other_m) + other_s;
    m = other_m;
  } else {
    s += other_s * expf(other_m - m);
  }
}

/// Where the gradient of logit v of a row goes: fp16 [rows, v8] for v < v8, else fp32 tail.
struct GradOut {
  __half* main = nullptr;
  float* tail = nullptr;
  std::int64_t v8 = 0;
};

/// Loss of one row (blockIdx.x) of logits [rows, vocab] and, if g.main is set, its gradient.
/// kVec = 4 reads float4 (vocab % 4 == 0).
/// The kVec logits of unit i (one float4 load when kVec == 4).
template <int kVec>
__device__ __forceinline__ void load_logits(const float* l, std::int64_t i, float (&v)[kVec]) {
  if constexpr (kVec == 4) {
    const float4 q = reinterpret_cast<const float4*>(l)[i];
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = l[i];
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(const float* logits, const int* targets, std::int64_t vocab,
                              float grad_factor, float* row_nll, GradOut g) {
  chain_release();
  chain_wait();
  __shared__ float warp_m[kRowThreads / 32], warp_s[kRowThreads / 32];
  const std::int64_t row = blockIdx.x;
  const float* l = logits + row * vocab;
  const int target = targets[row];
  const bool ignored = target == kIgnoreLabel;
  const std::int64_t units = vocab / kVec;
  float lse = 0.0f;
  if (!ignored) {
    float m = -INFINITY, s = 0.0f;
#pragma unroll 4
    for (std::int64_t i = threadIdx.x; i < units; i += kRowThreads) {
      float v[kVec];
      load_logits<kVec>(l, i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (v[k] > m) {
          s = s * expf(m - v[k]) + 1.0f;
          m = v[k];
        } else {
          s += expf(v[k] - m);
        }
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other_m = __shfl_xor_sync(0xffffffffu, m, offset);
      const float other_s = __shfl_xor_sync(0xffffffffu, s, offset);
      merge_max_sum(m, s, other_m, other_s);
    }
    if (threadIdx.x % 32 == 0) {
      warp_m[threadIdx.x / 32] = m;
      warp_s[threadIdx.x / 32] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (int w = 0; w < kRowThreads / 32; ++w) merge_max_sum(m, s, warp_m[w], warp_s[w]);
    lse = m + logf(s);
    if (threadIdx.x == 0) row_nll[row] = target >= 0 && target < vocab ? lse - l[target] : NAN;
  } else if (threadIdx.x == 0) {
    row_nll[row] = 0.0f;
  }
  if (g.main == nullptr) return;
#pragma unroll 4
  for (std::int64_t i = threadIdx.x; i < units; i += kRowThreads) {
    const std::int64_t v0 = i * kVec;
    float d[kVec];
    if (ignored) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) d[k] = 0.0f;
    } else {
      float v[kVec];
      load_logits<kVec>(l, i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        d[k] = (__expf(v[k] - lse) - (v0 + k == target ? 1.0f : 0.0f)) * grad_factor;
      }
    }
    if (v0 < g.v8) {  // kVec divides v8, so a unit is wholly in the GEMM part or in the tail
      HalfVec<kVec> h;
#pragma unroll
      for (int k = 0; k < kVec; ++k) h.v[k] = __float2half_rn(d[k]);
      *reinterpret_cast<HalfVec<kVec>*>(g.main + row * g.v8 + v0) = h;
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) g.tail[row * kTailWidth + (v0 + k - g.v8)] = d[k];
    }
  }
}

/// The share of the last `tail_cols` vocabulary columns (logit gradients in `tail`, fp32
/// [rows, kTailWidth]), one thread per hidden column c:
///   dhidden[r, c] += sum_v tail[r, v] lm_tail[v, c];  dlm_tail[v, c] += sum_r tail[r, v] hidden[r, c]
__global__ void __launch_bounds__(kTailThreads)
    vocab_tail_kernel(const float* tail, int tail_cols, const __half* hidden,
                      const __half* lm_tail, std::int64_t rows, std::int64_t hidden_size,
                      __half* dhidden, float* dlm_tail) {
  chain_release();
  chain_wait();
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kTailThreads + threadIdx.x;
  if (c >= hidden_size) return;
  float head[kTailWidth], acc[kTailWidth];
#pragma unroll
  for (int v = 0; v < kTailWidth; ++v) {
    head[v] = v < tail_cols ? __half2float(lm_tail[v * hidden_size + c]) : 0.0f;
    acc[v] = 0.0f;
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* t = tail + r * kTailWidth;
    if (dhidden != nullptr) {
      float dh = 0.0f;
#pragma unroll
      for (int v = 0; v < kTailWidth; ++v) dh += v < tail_cols ? t[v] * head[v] : 0.0f;
      __half* dst = dhidden + r * hidden_size + c;
      *dst = __float2half_rn(__half2float(*dst) + dh);
    }
    if (dlm_tail != nullptr) {
      const float h = __half2float(hidden[r * hidden_size + c]);
#pragma unroll
      for (int v = 0; v < kTailWidth; ++v) acc[v] += v < tail_cols ? t[v] * h : 0.0f;
    }
  }
  if (dlm_tail != nullptr) {
    for (int v = 0; v < tail_cols; ++v) dlm_tail[v * hidden_size + c] += acc[v];
  }
}

}  // namespace

// ---- host entry points ----

std::size_t cross_entropy_train_workspace_bytes(std::int64_t rows, std::int64_t vocab,
                                                const CrossEntropyTrainOptions& options) {
  const std::int64_t chunk =
      std::max<std::int64_t>(1, std::min(rows, std::max<std::int64_t>(1, options.row_chunk)));
  const auto n = static_cast<std::size_t>(chunk);
  return align256(n * static_cast<std::size_t>(vocab) * sizeof(float)) +
         align256(n * static_cast<std::size_t>(gemm_vocab(vocab)) * sizeof(__half)) +
         align256(n * kTailWidth * sizeof(float));
}

void cross_entropy_train(const __half* hidden, const __half* lm_head, const int* targets,
                         std::int64_t rows, std::int64_t hidden_size, std::int64_t vocab,
                         const CrossEntropyTrainOptions& options, float* row_nll,
                         __half* dhidden, float* dlm_head, void* workspace,
                         std::size_t workspace_bytes, cudaStream_t stream) {
  QG_CHECK(hidden && lm_head && targets && row_nll && workspace,
           "cross_entropy_train: null pointer");
  QG_CHECK(rows >= 0 && rows <= 0x7fffffff && hidden_size > 0 && vocab > 0 &&
               hidden_size % 8 == 0,
           "cross_entropy_train: rows ", rows, ", hidden ", hidden_size, ", vocab ", vocab,
           " (need rows >= 0, positive sizes, hidden a multiple of 8)");
  QG_CHECK(aligned16(hidden) && aligned16(lm_head) && (dhidden == nullptr || aligned16(dhidden)),
           "cross_entropy_train: hidden, lm_head and dhidden must be 16-byte aligned");
  QG_CHECK(options.row_chunk > 0 && options.normalizer > 0 && std::isfinite(options.normalizer),
           "cross_entropy_train: row_chunk ", options.row_chunk, " and normalizer ",
           options.normalizer, " must be positive");
  QG_CHECK(workspace_bytes >= cross_entropy_train_workspace_bytes(rows, vocab, options),
           "cross_entropy_train: workspace of ", workspace_bytes, " bytes, need ",
           cross_entropy_train_workspace_bytes(rows, vocab, options));
  if (rows == 0) return;
  const std::int64_t chunk = std::min(rows, options.row_chunk);
  const std::int64_t v8 = gemm_vocab(vocab);
  const int tail_cols = static_cast<int>(vocab - v8);
  auto* base = static_cast<char*>(workspace);
  auto* logits = reinterpret_cast<float*>(base);
  base += align256(static_cast<std::size_t>(chunk * vocab) * sizeof(float));
  auto* dlogits = reinterpret_cast<__half*>(base);
  base += align256(static_cast<std::size_t>(chunk * v8) * sizeof(__half));
  auto* tail = reinterpret_cast<float*>(base);

  const bool backward = dhidden != nullptr || dlm_head != nullptr;
  GradOut grad;
  if (backward) {
    grad.main = dlogits;
    grad.tail = tail;
    grad.v8 = v8;
  }
  const auto grad_factor = static_cast<float>(options.grad_scale / options.normalizer);
  const bool vec4 = vocab % 4 == 0;
  const auto* head = reinterpret_cast<const std::uint16_t*>(lm_head);
  const auto* d = reinterpret_cast<const std::uint16_t*>(dlogits);
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, rows - r0);
    const __half* hidden_c = hidden + r0 * hidden_size;
    const auto* h = reinterpret_cast<const std::uint16_t*>(hidden_c);
    gemm_f16(h, head, logits, true, n, vocab, hidden_size, GemmEpilogue{}, stream);
    const auto grid = static_cast<unsigned>(n);
    launch_chained(vec4 ? cross_entropy_rows_kernel<4> : cross_entropy_rows_kernel<1>, dim3(grid),
                   dim3(kRowThreads), 0, stream, logits, targets + r0, vocab, grad_factor,
                   row_nll + r0, grad);
    if (!backward) continue;
    __half* dhidden_c = dhidden != nullptr ? dhidden + r0 * hidden_size : nullptr;
    if (dhidden_c != nullptr) {
      if (v8 > 0) {
        gemm_f16_nn(d, head, dhidden_c, false, n, hidden_size, v8, GemmNnEpilogue{}, stream);
      } else {
        QG_CUDA_CHECK(cudaMemsetAsync(dhidden_c, 0,
                                      static_cast<std::size_t>(n * hidden_size) * sizeof(__half),
                                      stream));
      }
    }
    if (dlm_head != nullptr && v8 > 0) {
      gemm_f16_tn(d, h, dlm_head, true, v8, hidden_size, n, stream);
    }
    if (tail_cols > 0) {
      const auto blocks = static_cast<unsigned>((hidden_size + kTailThreads - 1) / kTailThreads);
      launch_chained(vocab_tail_kernel, dim3(blocks), dim3(kTailThreads), 0, stream, tail,
                     tail_cols, hidden_c, lm_head + v8 * hidden_size, n, hidden_size, dhidden_c,
                     dlm_head != nullptr ? dlm_head + v8 * hidden_size : nullptr);
    }
  }
}

}  // namespace qg::cuda
