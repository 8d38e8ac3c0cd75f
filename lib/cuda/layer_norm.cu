// Row LayerNorm in fp16 with fp32 statistics (see include/qinggeng/cuda/layer_norm.h).
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
                      std::int64_t cols, __half* out) {
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

}  // namespace

// ---- kernel launcher ----

void layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                std::int64_t rows, std::int64_t cols, __half* out, cudaStream_t stream) {
  QG_CHECK(x && gamma && beta && out, "layer_norm: null pointer");
  QG_CHECK(rows >= 0 && cols > 0 && eps >= 0.0f, "layer_norm: rows ", rows, ", cols ", cols,
           ", eps ", eps, " (need rows >= 0, cols > 0, eps >= 0)");
  QG_CHECK(rows <= 0x7fffffff, "layer_norm: ", rows, " rows exceed one launch");
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows);
  if (cols % 8 == 0 && aligned16(x) && aligned16(gamma) && aligned16(beta) && aligned16(out)) {
    layer_norm_kernel<8><<<grid, kThreads, 0, stream>>>(x, gamma, beta, eps, cols, out);
  } else {
    layer_norm_kernel<1><<<grid, kThreads, 0, stream>>>(x, gamma, beta, eps, cols, out);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
