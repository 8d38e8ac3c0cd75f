// Device conversions between fp16 Linear weights and the quantized formats of
// qinggeng/tensor/quantize.h: the load-time quantizer (bit-equal to the host reference: same
// IEEE division, the same round-up of the scale to fp16, round-half-even of w / scale) and the
// dequantizer the prefill path of quant_gemm multiplies with.
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "cuda/quant_paths.h"
#include "qinggeng/cuda/quant_gemm.h"

namespace qg::cuda {
namespace {

using tensor::QuantScheme;

constexpr int kRowThreads = 128;  // int8: one CTA per row
constexpr int kGroupWarps = 8;    // int4: one warp per group of 128, 8 groups per CTA

// ---- CUDA kernels ----

/// Largest |v| of 32 lanes, on every lane.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// The scale of a block (tensor::quant_scale): max / qmax rounded up to fp16 (always finite:
/// fp16 weights are at most 65504).
__device__ __forceinline__ __half block_scale(float max_abs, float qmax) {
  return __float2half_ru(max_abs / qmax);
}

__device__ __forceinline__ int quantize_value(float w, float scale) {
  return scale == 0.0f ? 0 : static_cast<int>(rintf(w / scale));
}

__global__ void __launch_bounds__(kRowThreads)
    quantize_int8_kernel(const __half* __restrict__ w, std::int8_t* __restrict__ q,
                         __half* __restrict__ scales, std::int64_t K, int* bad) {
  __shared__ float warp_maxima[kRowThreads / 32];
  const std::int64_t n = blockIdx.x;
  const __half* row = w + n * K;
  float max_abs = 0.0f;
  bool finite = true;
  for (std::int64_t k = threadIdx.x * 8; k < K; k += kRowThreads * 8) {
    const HalfVec<8> v = *reinterpret_cast<const HalfVec<8>*>(row + k);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float f = __half2float(v.v[i]);
      finite = finite && isfinite(f);
      max_abs = fmaxf(max_abs, fabsf(f));
    }
  }
  max_abs = warp_max(max_abs);
  if (threadIdx.x % 32 == 0) warp_maxima[threadIdx.x / 32] = max_abs;
  if (!__syncthreads_and(finite)) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    return;
  }
  for (int i = 0; i < kRowThreads / 32; ++i) max_abs = fmaxf(max_abs, warp_maxima[i]);
  const __half scale_h = block_scale(max_abs, 127.0f);
  if (threadIdx.x == 0) scales[n] = scale_h;
  const float scale = __half2float(scale_h);
  for (std::int64_t k = threadIdx.x * 8; k < K; k += kRowThreads * 8) {
    const HalfVec<8> v = *reinterpret_cast<const HalfVec<8>*>(row + k);
    std::uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const auto b = static_cast<std::uint8_t>(quantize_value(__half2float(v.v[i]), scale));
      packed[i / 4] |= static_cast<std::uint32_t>(b) << (8 * (i % 4));
    }
    *reinterpret_cast<uint2*>(q + n * K + k) = make_uint2(packed[0], packed[1]);
  }
}

__global__ void __launch_bounds__(kGroupWarps * 32)
    quantize_int4_kernel(const __half* __restrict__ w, std::uint8_t* __restrict__ q,
                         __half* __restrict__ scales, std::int64_t groups, int* bad) {
  const std::int64_t group =
      static_cast<std::int64_t>(blockIdx.x) * kGroupWarps + threadIdx.x / 32;
  if (group >= groups) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  // Groups are consecutive in memory: group g covers elements [128 g, 128 g + 128).
  const std::int64_t at = group * tensor::kQuantGroup + 4 * lane;
  const HalfVec<4> v = *reinterpret_cast<const HalfVec<4>*>(w + at);
  float f[4], max_abs = 0.0f;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[i] = __half2float(v.v[i]);
    finite = finite && isfinite(f[i]);
    max_abs = fmaxf(max_abs, fabsf(f[i]));
  }
  max_abs = warp_max(max_abs);
  if (!__all_sync(0xffffffffu, finite)) {
    if (lane == 0) atomicOr(bad, 1);
    return;
  }
  const __half scale_h = block_scale(max_abs, 7.0f);
  if (lane == 0) scales[group] = scale_h;
  const float scale = __half2float(scale_h);
  std::uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    packed |= static_cast<std::uint32_t>(quantize_value(f[i], scale) + 8) << (4 * i);
  }
  *reinterpret_cast<std::uint16_t*>(q + at / 2) = static_cast<std::uint16_t>(packed);
}

/// Eight consecutive elements per thread (K % 8 == 0: never across rows).
__global__ void dequantize_kernel(const void* __restrict__ data, const __half* __restrict__ scales,
                                  QuantScheme scheme, std::int64_t K, std::int64_t chunks,
                                  __half* __restrict__ w) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const std::int64_t at = c * 8, n = at / K, k = at % K;
  int q[8];
  float scale;
  if (scheme == QuantScheme::Int8PerChannel) {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const std::int8_t*>(data) + at);
    const std::uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[i] = static_cast<std::int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xff);
    }
    scale = __half2float(scales[n]);
  } else {
    const std::uint32_t raw =
        *reinterpret_cast<const std::uint32_t*>(static_cast<const std::uint8_t*>(data) + at / 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = static_cast<int>((raw >> (4 * i)) & 0xf) - 8;
    scale = __half2float(scales[n * (K / tensor::kQuantGroup) + k / tensor::kQuantGroup]);
  }
  HalfVec<8> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = __float2half_rn(static_cast<float>(q[i]) * scale);
  *reinterpret_cast<HalfVec<8>*>(w + at) = out;
}

}  // namespace

void check_device_quant_shape(QuantScheme scheme, std::int64_t N, std::int64_t K,
                              const char* name) {
  tensor::check_quant_shape(scheme, N, K, name);
  QG_CHECK(K % 16 == 0, name, ": quantized weights on the GPU need K (columns) to be a multiple "
           "of 16, got K = ", K);
}

// ---- launchers ----

QuantizedWeight quantize_weight(const std::uint16_t* w, QuantizedWeight::Scheme scheme,
                                std::int64_t N, std::int64_t K, void* data,
                                std::uint16_t* scales, const char* name, cudaStream_t stream) {
  check_device_quant_shape(scheme, N, K, name);
  QG_CHECK(w && data && scales, name, ": quantize_weight needs device pointers (got a null "
           "pointer)");
  QG_CHECK(aligned16(w) && aligned16(data) && reinterpret_cast<std::uintptr_t>(scales) % 2 == 0,
           name, ": quantize_weight needs 16-byte aligned w and data");
  int* bad = nullptr;
  QG_CUDA_CHECK(cudaMallocAsync(&bad, sizeof(int), stream));
  QG_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), stream));
  const auto* wh = reinterpret_cast<const __half*>(w);
  auto* sh = reinterpret_cast<__half*>(scales);
  if (scheme == QuantScheme::Int8PerChannel) {
    QG_CHECK(N <= 0x7fffffff, name, ": N = ", N, " is too large for one launch");
    quantize_int8_kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
        wh, static_cast<std::int8_t*>(data), sh, K, bad);
  } else {
    const std::int64_t groups = N * (K / tensor::kQuantGroup);
    const std::int64_t ctas = (groups + kGroupWarps - 1) / kGroupWarps;
    QG_CHECK(ctas <= 0x7fffffff, name, ": N = ", N, " is too large for one launch");
    quantize_int4_kernel<<<static_cast<unsigned>(ctas), kGroupWarps * 32, 0, stream>>>(
        wh, static_cast<std::uint8_t*>(data), sh, groups, bad);
  }
  const cudaError_t launched = cudaGetLastError();
  int found = 0;
  const cudaError_t copied = cudaMemcpyAsync(&found, bad, sizeof(int), cudaMemcpyDeviceToHost,
                                             stream);
  const cudaError_t freed = cudaFreeAsync(bad, stream);
  QG_CUDA_CHECK(launched);
  QG_CUDA_CHECK(copied);
  QG_CUDA_CHECK(freed);
  QG_CUDA_CHECK(cudaStreamSynchronize(stream));
  QG_CHECK(found == 0, name, ": the weight holds a non-finite value (inf or NaN) and cannot be "
           "quantized");
  return QuantizedWeight{scheme, data, scales, N, K};
}

void dequantize_weight(const QuantizedWeight& qw, std::uint16_t* w, cudaStream_t stream) {
  check_device_quant_shape(qw.scheme, qw.N, qw.K, "dequantize_weight");
  QG_CHECK(qw.data && qw.scales && w, "dequantize_weight: null pointer");
  QG_CHECK(aligned16(qw.data) && aligned16(w), "dequantize_weight: data and w must be 16-byte "
           "aligned");
  const std::int64_t chunks = qw.N * qw.K / 8;
  constexpr int kThreads = 256;
  const std::int64_t ctas = (chunks + kThreads - 1) / kThreads;
  QG_CHECK(ctas <= 0x7fffffff, "dequantize_weight: N = ", qw.N, " is too large for one launch");
  dequantize_kernel<<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
      qw.data, reinterpret_cast<const __half*>(qw.scales), qw.scheme, qw.K, chunks,
      reinterpret_cast<__half*>(w));
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
