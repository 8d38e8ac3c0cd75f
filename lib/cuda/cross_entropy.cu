// Fused vocabulary cross-entropy of a training step (include/qinggeng/cuda/cross_entropy.h).
// Per chunk of rows: logits = hidden lm_head^T into an fp32 scratch (gemm_f16), then one
// 512-thread block per row takes an online max / sum-exp over the vocabulary, the NLL of the
// target and writes dlogits = (softmax - onehot) * grad_scale / normalizer as fp16, which
// gemm_f16_nn turns into dhidden (and gemm_f16_tn into dlm_head). Only row_chunk x vocab
// logits exist at a time.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/check.h"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kIgnore = -100;

std::size_t align256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- CUDA kernels ----

/// (max, sum of exp(v - max)) pairs merged.
__device__ __forceinline__ void merge(float& m, float& s, float om, float os) {
  const float nm = fmaxf(m, om);
  if (nm == -INFINITY) return;
  s = s * __expf(m - nm) + os * __expf(om - nm);
  m = nm;
}

__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(const float* logits, const int* targets, std::int64_t vocab,
                              float grad_factor, float* row_nll, __half* dlogits) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  const std::int64_t row = blockIdx.x;
  const float* l = logits + row * vocab;
  const int target = targets[row];
  if (target == kIgnore) {
    if (threadIdx.x == 0) row_nll[row] = 0.0f;
    if (dlogits != nullptr) {
      for (std::int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        dlogits[row * vocab + v] = __float2half_rn(0.0f);
      }
    }
    return;
  }
  float m = -INFINITY, s = 0.0f;
  for (std::int64_t v = threadIdx.x; v < vocab; v += kThreads) merge(m, s, l[v], 1.0f);
  for (int off = 16; off > 0; off /= 2) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) merge(m, s, sm[w], ss[w]);
  const float lse = m + logf(s);
  const bool valid = target >= 0 && target < vocab;
  if (threadIdx.x == 0) row_nll[row] = valid ? lse - l[target] : NAN;
  if (dlogits == nullptr) return;
  for (std::int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float p = __expf(l[v] - lse) - (v == target ? 1.0f : 0.0f);
    dlogits[row * vocab + v] = __float2half_rn(p * grad_factor);
  }
}

}  // namespace

// ---- host entry points ----

std::size_t cross_entropy_train_workspace_bytes(std::int64_t rows, std::int64_t vocab,
                                                const CrossEntropyTrainOptions& options) {
  const std::int64_t chunk = std::max<std::int64_t>(1, std::min(rows, options.row_chunk));
  const std::size_t n = static_cast<std::size_t>(chunk * vocab);
  return align256(n * sizeof(float)) + align256(n * sizeof(__half));
}

void cross_entropy_train(const __half* hidden, const __half* lm_head, const int* targets,
                         std::int64_t rows, std::int64_t hidden_size, std::int64_t vocab,
                         const CrossEntropyTrainOptions& options, float* row_nll,
                         __half* dhidden, float* dlm_head, void* workspace,
                         std::size_t workspace_bytes, cudaStream_t stream) {
  QG_CHECK(hidden && lm_head && targets && row_nll && workspace,
           "cross_entropy_train: null pointer");
  QG_CHECK(rows > 0 && hidden_size > 0 && vocab > 0 && hidden_size % 8 == 0,
           "cross_entropy_train: rows ", rows, ", hidden ", hidden_size, ", vocab ", vocab,
           " (need positive sizes, hidden a multiple of 8)");
  QG_CHECK(options.row_chunk > 0 && options.normalizer > 0,
           "cross_entropy_train: row_chunk and normalizer must be positive");
  QG_CHECK((dhidden == nullptr && dlm_head == nullptr) || vocab % 8 == 0,
           "cross_entropy_train: the backward needs vocab (", vocab, ") a multiple of 8");
  QG_CHECK(workspace_bytes >= cross_entropy_train_workspace_bytes(rows, vocab, options),
           "cross_entropy_train: workspace of ", workspace_bytes, " bytes, need ",
           cross_entropy_train_workspace_bytes(rows, vocab, options));
  const std::int64_t chunk = std::min(rows, options.row_chunk);
  float* logits = static_cast<float*>(workspace);
  __half* dlogits = reinterpret_cast<__half*>(
      static_cast<char*>(workspace) + align256(static_cast<std::size_t>(chunk * vocab) * 4));
  const bool backward = dhidden != nullptr || dlm_head != nullptr;
  const float grad_factor = static_cast<float>(options.grad_scale / options.normalizer);
  const auto* head = reinterpret_cast<const std::uint16_t*>(lm_head);
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, rows - r0);
    const auto* h = reinterpret_cast<const std::uint16_t*>(hidden + r0 * hidden_size);
    gemm_f16(h, head, logits, true, n, vocab, hidden_size, GemmEpilogue{}, stream);
    cross_entropy_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        logits, targets + r0, vocab, grad_factor, row_nll + r0, backward ? dlogits : nullptr);
    QG_CUDA_CHECK(cudaGetLastError());
    const auto* d = reinterpret_cast<const std::uint16_t*>(dlogits);
    if (dhidden != nullptr) {
      gemm_f16_nn(d, head, dhidden + r0 * hidden_size, false, n, hidden_size, vocab,
                  GemmNnEpilogue{}, stream);
    }
    if (dlm_head != nullptr) gemm_f16_tn(d, h, dlm_head, true, vocab, hidden_size, n, stream);
  }
}

}  // namespace qg::cuda
