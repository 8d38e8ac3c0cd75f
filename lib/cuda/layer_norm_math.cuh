// The per-element arithmetic of the GPU LayerNorm, shared by the LayerNorm kernels
// (layer_norm.cu) and the decode GEMM that fuses its input LayerNorm (gemm_skinny.cu), so that
// both give the same bits. Every product and sum is rounded on its own or fused explicitly (no
// FMA contraction left to the compiler, which may choose differently per call site); the row
// sums are formed in the same order by both (each of 256 threads adds its 8-wide vectors t,
// t + 256, ... in turn, warps fold with xor shuffles 16, 8, 4, 2, 1, then the 8 warp totals
// are added in order).
#pragma once

#include <cuda_fp16.h>

#include "cuda/half_vector.cuh"

namespace qg::cuda {

#ifdef __CUDACC__
/// \brief sq + (x - mean)^2, the variance pass's step.
__device__ __forceinline__ float layer_norm_square_add(float sq, float x, float mean) {
  const float d = __fsub_rn(x, mean);
  return __fmaf_rn(d, d, sq);
}

/// \brief (x - mean) * inv * gamma + beta.
__device__ __forceinline__ float layer_norm_value(float x, float mean, float inv, float gamma,
                                                  float beta) {
  return __fmaf_rn(__fmul_rn(__fsub_rn(x, mean), inv), gamma, beta);
}

/// \brief A vector of x normalised and rounded to fp16, as the LayerNorm stores it.
template <int kVec>
__device__ __forceinline__ HalfVec<kVec> layer_norm_vector(const HalfVec<kVec>& x, float mean,
                                                           float inv, const HalfVec<kVec>& gamma,
                                                           const HalfVec<kVec>& beta) {
  HalfVec<kVec> r;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    r.v[k] = __float2half_rn(layer_norm_value(__half2float(x.v[k]), mean, inv,
                                              __half2float(gamma.v[k]), __half2float(beta.v[k])));
  }
  return r;
}

/// \brief The row's mean from the block total of its values.
__device__ __forceinline__ float layer_norm_mean(float total, float cols) {
  return __fdiv_rn(total, cols);
}

/// \brief 1 / sqrt(variance + eps) from the block total of the squared deviations.
__device__ __forceinline__ float layer_norm_rstd(float total_sq, float cols, float eps) {
  return rsqrtf(__fadd_rn(__fdiv_rn(total_sq, cols), eps));
}
#endif  // __CUDACC__

}  // namespace qg::cuda
