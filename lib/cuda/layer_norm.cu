// Row LayerNorm in fp16 with fp32 statistics (see include/qinggeng/cuda/layer_norm.h), and its
// training pair: the forward that saves mean and rstd, and the backward.
// One 256-thread block per row; the row is read three times (sum, centred sum of squares,
// normalise), the second and third times from L1/L2 (a 4096-wide row is 8 KB).
#include <cstdint>

#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kThreads = 256;

// ---- CUDA kernels ----

__device__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

template <int kVec>
__global__ void __launch_bounds__(kThreads)
    layer_norm_kernel(const __half* x, const __half* gamma, const __half* beta, float eps,
                      std::int64_t cols, __half* out, float* mean_out, float* rstd_out) {
  __shared__ float scratch[kThreads / 32];
  const std::int64_t units = cols / kVec;
  const auto* row = reinterpret_cast<const HalfVec<kVec>*>(x + blockIdx.x * cols);
  const auto* g = reinterpret_cast<const HalfVec<kVec>*>(gamma);
  const auto* bt = reinterpret_cast<const HalfVec<kVec>*>(beta);
  auto* dst = reinterpret_cast<HalfVec<kVec>*>(out + blockIdx.x * cols);

  float sum = 0.0f;
  for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
    const HalfVec<kVec> v = row[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += __half2float(v.v[k]);
  }
  const float mean = block_sum(sum, scratch) / static_cast<float>(cols);
  float sq = 0.0f;
  for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
    const HalfVec<kVec> v = row[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float d = __half2float(v.v[k]) - mean;
      sq += d * d;
    }
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / static_cast<float>(cols) + eps);
  if (mean_out != nullptr && threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = inv;
  }
  for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
    const HalfVec<kVec> v = row[i], gv = g[i], bv = bt[i];
    HalfVec<kVec> r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      r.v[k] = __float2half_rn((__half2float(v.v[k]) - mean) * inv * __half2float(gv.v[k]) +
                               __half2float(bv.v[k]));
    }
    dst[i] = r;
  }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * gamma; dgamma/dbeta column sums
// by fp32 atomics (full-parameter training only: LoRA leaves them null).
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    layer_norm_backward_kernel(const __half* x, const __half* gamma, const float* mean,
                               const float* rstd, const __half* dy, std::int64_t cols,
                               __half* dx, float* dgamma, float* dbeta) {
  __shared__ float scratch[kThreads / 32];
  const std::int64_t units = cols / kVec;
  const std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * cols;
  const auto* xr = reinterpret_cast<const HalfVec<kVec>*>(x + base);
  const auto* dyr = reinterpret_cast<const HalfVec<kVec>*>(dy + base);
  const auto* g = reinterpret_cast<const HalfVec<kVec>*>(gamma);
  const float mu = mean[blockIdx.x], inv = rstd[blockIdx.x];
  float s1 = 0.0f, s2 = 0.0f;
  for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
    const HalfVec<kVec> xv = xr[i], dv = dyr[i], gv = g[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float gd = __half2float(dv.v[k]) * __half2float(gv.v[k]);
      s1 += gd;
      s2 += gd * (__half2float(xv.v[k]) - mu) * inv;
    }
  }
  const float n = static_cast<float>(cols);
  const float mean_g = block_sum(s1, scratch) / n;
  const float mean_gx = block_sum(s2, scratch) / n;
  auto* out = reinterpret_cast<HalfVec<kVec>*>(dx + base);
  for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
    const HalfVec<kVec> xv = xr[i], dv = dyr[i], gv = g[i];
    HalfVec<kVec> r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float xhat = (__half2float(xv.v[k]) - mu) * inv;
      const float d = __half2float(dv.v[k]);
      r.v[k] = __float2half_rn(inv * (d * __half2float(gv.v[k]) - mean_g - xhat * mean_gx));
      if (dgamma != nullptr) atomicAdd(dgamma + i * kVec + k, d * xhat);
      if (dbeta != nullptr) atomicAdd(dbeta + i * kVec + k, d);
    }
    out[i] = r;  // dx may alias dy: this unit was read above by this thread only
  }
}

void check_sizes(std::int64_t rows, std::int64_t cols, float eps, const char* op) {
  QG_CHECK(rows >= 0 && cols > 0 && eps >= 0.0f, op, ": rows ", rows, ", cols ", cols, ", eps ",
           eps, " (need rows >= 0, cols > 0, eps >= 0)");
  QG_CHECK(rows <= 0x7fffffff, op, ": ", rows, " rows exceed one launch");
}

void launch_layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                       std::int64_t rows, std::int64_t cols, __half* out, float* mean,
                       float* rstd, cudaStream_t stream) {
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows);
  if (cols % 8 == 0 && aligned16(x) && aligned16(gamma) && aligned16(beta) && aligned16(out)) {
    layer_norm_kernel<8><<<grid, kThreads, 0, stream>>>(x, gamma, beta, eps, cols, out, mean, rstd);
  } else {
    layer_norm_kernel<1><<<grid, kThreads, 0, stream>>>(x, gamma, beta, eps, cols, out, mean, rstd);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---- kernel launchers ----

void layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                std::int64_t rows, std::int64_t cols, __half* out, cudaStream_t stream) {
  QG_CHECK(x && gamma && beta && out, "layer_norm: null pointer");
  check_sizes(rows, cols, eps, "layer_norm");
  launch_layer_norm(x, gamma, beta, eps, rows, cols, out, nullptr, nullptr, stream);
}

void layer_norm_forward_stats(const __half* x, const __half* gamma, const __half* beta,
                              float eps, std::int64_t rows, std::int64_t cols, __half* out,
                              float* mean, float* rstd, cudaStream_t stream) {
  QG_CHECK(x && gamma && beta && out && mean && rstd, "layer_norm_forward_stats: null pointer");
  QG_CHECK(x != out, "layer_norm_forward_stats: out must not alias x (the backward reads x)");
  check_sizes(rows, cols, eps, "layer_norm_forward_stats");
  launch_layer_norm(x, gamma, beta, eps, rows, cols, out, mean, rstd, stream);
}

void layer_norm_backward(const __half* x, const __half* gamma, const float* mean,
                         const float* rstd, const __half* dy, std::int64_t rows,
                         std::int64_t cols, __half* dx, float* dgamma, float* dbeta,
                         cudaStream_t stream) {
  QG_CHECK(x && gamma && mean && rstd && dy && dx, "layer_norm_backward: null pointer");
  check_sizes(rows, cols, 0.0f, "layer_norm_backward");
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows);
  if (cols % 8 == 0 && aligned16(x) && aligned16(gamma) && aligned16(dy) && aligned16(dx)) {
    layer_norm_backward_kernel<8><<<grid, kThreads, 0, stream>>>(x, gamma, mean, rstd, dy, cols,
                                                                 dx, dgamma, dbeta);
  } else {
    layer_norm_backward_kernel<1><<<grid, kThreads, 0, stream>>>(x, gamma, mean, rstd, dy, cols,
                                                                 dx, dgamma, dbeta);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
