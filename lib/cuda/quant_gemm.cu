// Weight-only quantized GEMM (qinggeng/cuda/quant_gemm.h). Decode (M <= 16) is memory-bound:
// each CTA owns 32 rows of Wq and its 8 warps split K; every lane loads 16 bytes of one
// quantized row (16 int8 or 32 int4 values) straight into registers, turns them into fp16
// with integer tricks (no conversion instructions) and feeds them to mma.sync as B
// fragments, with the 16 tokens of X as the A operand. As in gemm_skinny.cu, the K order of
// the fragments is permuted identically for X and W (dot products do not care), so that
// each load is exactly the data of whole mma steps:
//  - int8: word s of a lane's chunk (k 4s..4s+3) is one m16n8k16 step; the per-channel scale
//    multiplies the fp32 sum once, in the epilogue.
//  - int4: nibble extraction naturally yields the pairs (k, k+4) of an 8-value word, so the
//    lane's X words are re-paired with byte permutes to match; the group scale (one per
//    128-wide warp slice) multiplies the fp16 weights (one rounding, like fp16 weights).
// Prefill (M > 16) dequantizes into the caller's scratch and runs gemm_f16.
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/half_vector.cuh"
#include "cuda/quant_paths.h"
#include "qinggeng/cuda/quant_gemm.h"

namespace qg::cuda {
namespace {

using tensor::QuantScheme;
using tiles::Epilogue;

constexpr int kWarps = 8;   // K-split inside a CTA
constexpr int kNFrags = 4;  // n8 fragments per CTA: 32 rows of Wq
constexpr int kRowsPerCta = kNFrags * 8;

/// Quantized values one lane loads per row (one 16-byte load).
template <QuantScheme S>
constexpr int kLaneK = S == QuantScheme::Int8PerChannel ? 16 : 32;
/// K a warp consumes per step: four lanes share a row.
template <QuantScheme S>
constexpr int kSliceK = 4 * kLaneK<S>;

template <QuantScheme S>
struct QuantRegs {
  uint4 w[kNFrags];               // w[j]: row n0 + 8j + lane/4, this lane's kLaneK values
  uint4 x[2][kLaneK<S> / 8];      // x[r][c]: X row 8r + lane/4, halves 8c..8c+7 of the chunk
  __half2 scale[kNFrags];         // int4: the group scale of row j, twice (int8: unused)
};

// ---- register-level conversions ----

__device__ __forceinline__ std::uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ __half2 as_half2(std::uint32_t u) {
  __half2 h;
  memcpy(&h, &u, sizeof h);
  return h;
}

__device__ __forceinline__ std::uint32_t as_u32(__half2 h) {
  std::uint32_t u;
  memcpy(&u, &h, sizeof u);
  return u;
}

/// Four int8 (k0..k3) -> fp16 pairs (k0, k1) and (k2, k3), exactly: bias each byte to
/// q + 128, splice it under the exponent of 1024 (0x64xx = 1024 + xx), subtract 1152.
__device__ __forceinline__ void int8x4_to_half(std::uint32_t q, std::uint32_t& lo,
                                               std::uint32_t& hi) {
  const std::uint32_t biased = q ^ 0x80808080u;
  const __half2 offset = as_half2(0x64806480u);  // 1152
  lo = as_u32(__hsub2(as_half2(__byte_perm(biased, 0x64646464u, 0x4140)), offset));
  hi = as_u32(__hsub2(as_half2(__byte_perm(biased, 0x64646464u, 0x4342)), offset));
}

/// Eight int4 (k0..k7, low nibble first, stored q + 8) -> scale * q as fp16 pairs
/// p[i] = (k_i, k_{i+4}): a nibble under the exponent of 1024 is 1024 + q + 8; subtract 1032.
__device__ __forceinline__ void int4x8_to_half(std::uint32_t q, __half2 scale,
                                               std::uint32_t (&p)[4]) {
  const __half2 offset = as_half2(0x64086408u);  // 1032
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::uint32_t v = ((q >> (4 * i)) & 0x000f000fu) | 0x64006400u;
    p[i] = as_u32(__hmul2(__hsub2(as_half2(v), offset), scale));
  }
}

// ---- CUDA kernels ----

template <QuantScheme S>
__device__ __forceinline__ void load_slice(QuantRegs<S>& r, const __half* __restrict__ x,
                                           const void* __restrict__ data,
                                           const __half* __restrict__ scales, const Epilogue& e,
                                           std::int64_t n0, std::int64_t k, std::int64_t K) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const std::int64_t kk = k + kLaneK<S> * t;
  const bool k_ok = kk < K;  // K % 16 (int8) or % 128 (int4): a chunk is all in or all out
#pragma unroll
  for (int j = 0; j < kNFrags; ++j) {
    const std::int64_t n = n0 + 8 * j + g;
    const bool ok = k_ok && n < e.N;
    const std::int64_t byte = S == QuantScheme::Int8PerChannel ? n * K + kk : (n * K + kk) / 2;
    // Streaming (evict-first) loads: every quantized byte is read exactly once.
    r.w[j] = ok ? __ldcs(reinterpret_cast<const uint4*>(static_cast<const std::uint8_t*>(data) +
                                                         byte))
                : make_uint4(0, 0, 0, 0);
    if constexpr (S == QuantScheme::Int4Group128) {
      const std::int64_t group = n * (K / tensor::kQuantGroup) + kk / tensor::kQuantGroup;
      r.scale[j] = __half2half2(ok ? scales[group] : __ushort_as_half(0));
    }
  }
#pragma unroll
  for (int rb = 0; rb < 2; ++rb) {
    const std::int64_t m = 8 * rb + g;
    const bool ok = k_ok && m < e.M;
#pragma unroll
    for (int c = 0; c < kLaneK<S> / 8; ++c) {
      r.x[rb][c] = ok ? __ldg(reinterpret_cast<const uint4*>(x + m * K + kk + 8 * c))
                      : make_uint4(0, 0, 0, 0);
    }
  }
}

__device__ __forceinline__ void mma_slice(float (&acc)[kNFrags][4],
                                          const QuantRegs<QuantScheme::Int8PerChannel>& r) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    // X halves 4s..4s+3 of the chunk are words 2s and 2s+1.
    const uint4& lo = r.x[0][s / 2];
    const uint4& hi = r.x[1][s / 2];
    const std::uint32_t a[4] = {word(lo, 2 * (s % 2)), word(hi, 2 * (s % 2)),
                                word(lo, 2 * (s % 2) + 1), word(hi, 2 * (s % 2) + 1)};
#pragma unroll
    for (int j = 0; j < kNFrags; ++j) {
      std::uint32_t b0, b1;
      int8x4_to_half(word(r.w[j], s), b0, b1);
      tiles::mma_16816(acc[j], a, b0, b1);
    }
  }
}

__device__ __forceinline__ void mma_slice(float (&acc)[kNFrags][4],
                                          const QuantRegs<QuantScheme::Int4Group128>& r) {
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    // X halves 8wi..8wi+7 as words e0..e3 = (k0,k1) (k2,k3) (k4,k5) (k6,k7), re-paired to
    // (k0,k4) | (k1,k5) for the first mma step and (k2,k6) | (k3,k7) for the second.
    const uint4& lo = r.x[0][wi];
    const uint4& hi = r.x[1][wi];
    const std::uint32_t a0[4] = {__byte_perm(lo.x, lo.z, 0x5410), __byte_perm(hi.x, hi.z, 0x5410),
                                 __byte_perm(lo.x, lo.z, 0x7632), __byte_perm(hi.x, hi.z, 0x7632)};
    const std::uint32_t a1[4] = {__byte_perm(lo.y, lo.w, 0x5410), __byte_perm(hi.y, hi.w, 0x5410),
                                 __byte_perm(lo.y, lo.w, 0x7632), __byte_perm(hi.y, hi.w, 0x7632)};
#pragma unroll
    for (int j = 0; j < kNFrags; ++j) {
      std::uint32_t p[4];
      int4x8_to_half(word(r.w[j], wi), r.scale[j], p);
      tiles::mma_16816(acc[j], a0, p[0], p[1]);
      tiles::mma_16816(acc[j], a1, p[2], p[3]);
    }
  }
}

template <QuantScheme S>
__global__ void __launch_bounds__(kWarps * 32)
    quant_decode_kernel(const __half* __restrict__ x, const void* __restrict__ data,
                        const __half* __restrict__ scales, Epilogue e, std::int64_t K) {
  __shared__ float partial[kWarps][kNFrags][32][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kRowsPerCta;

  float acc[kNFrags][4] = {};
  // Warps interleave over K so that the CTA reads each row front to back together; the next
  // slice's loads are issued before this slice's math.
  std::int64_t k = static_cast<std::int64_t>(warp) * kSliceK<S>;
  constexpr std::int64_t kStep = kWarps * kSliceK<S>;
  QuantRegs<S> cur;
  if (k < K) load_slice(cur, x, data, scales, e, n0, k, K);
  for (; k < K; k += kStep) {
    QuantRegs<S> next;
    if (k + kStep < K) load_slice(next, x, data, scales, e, n0, k + kStep, K);
    mma_slice(acc, cur);
    cur = next;
  }

#pragma unroll
  for (int f = 0; f < kNFrags; ++f)
#pragma unroll
    for (int v = 0; v < 4; ++v) partial[warp][f][lane][v] = acc[f][v];
  __syncthreads();
  if (threadIdx.x >= kNFrags * 32) return;
  const int j = warp;  // warp j sums fragment j over the K-split
  float sum[4] = {};
#pragma unroll
  for (int w = 0; w < kWarps; ++w)
#pragma unroll
    for (int v = 0; v < 4; ++v) sum[v] += partial[w][j][lane][v];
  const std::int64_t col = n0 + 8 * j + (lane % 4) * 2;
  if constexpr (S == QuantScheme::Int8PerChannel) {
    const float s0 = col < e.N ? __half2float(scales[col]) : 0.0f;
    const float s1 = col + 1 < e.N ? __half2float(scales[col + 1]) : 0.0f;
    sum[0] *= s0;
    sum[1] *= s1;
    sum[2] *= s0;
    sum[3] *= s1;
  }
  tiles::store_pair(e, lane / 4, col, sum[0], sum[1]);
  tiles::store_pair(e, lane / 4 + 8, col, sum[2], sum[3]);
}

// ---- kernel launcher ----

void launch_quant_decode(const __half* x, const QuantizedWeight& qw, const Epilogue& e,
                         cudaStream_t stream) {
  const std::int64_t ctas = (qw.N + kRowsPerCta - 1) / kRowsPerCta;
  QG_CHECK(ctas <= 0x7fffffff, "quant_gemm: N = ", qw.N, " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(ctas));
  const auto* scales = static_cast<const __half*>(qw.scales);
  if (qw.scheme == QuantScheme::Int8PerChannel) {
    quant_decode_kernel<QuantScheme::Int8PerChannel>
        <<<grid, kWarps * 32, 0, stream>>>(x, qw.data, scales, e, qw.K);
  } else {
    quant_decode_kernel<QuantScheme::Int4Group128>
        <<<grid, kWarps * 32, 0, stream>>>(x, qw.data, scales, e, qw.K);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void quant_gemm(const std::uint16_t* x, const QuantizedWeight& qw, void* y, bool y_fp32,
                std::int64_t M, const GemmEpilogue& epilogue, cudaStream_t stream,
                std::uint16_t* scratch) {
  check_device_quant_shape(qw.scheme, qw.N, qw.K, "quant_gemm");
  QG_CHECK(M >= 0, "quant_gemm: M = ", M, " must not be negative");
  if (M == 0) return;
  QG_CHECK(x && y && qw.data && qw.scales,
           "quant_gemm: x, y and the weight's data and scales must be device pointers (got a "
           "null pointer)");
  if (M > kQuantDecodeMaxM) {
    QG_CHECK(scratch, "quant_gemm: M = ", M, " > ", kQuantDecodeMaxM,
             " needs an fp16 scratch buffer [N, K] for the dequantized weight");
    dequantize_weight(qw, scratch, stream);
    gemm_f16(x, scratch, y, y_fp32, M, qw.N, qw.K, epilogue, stream);
    return;
  }
  QG_CHECK(aligned16(x) && aligned16(qw.data) &&
               reinterpret_cast<std::uintptr_t>(qw.scales) % 2 == 0,
           "quant_gemm: x and the weight's data must be 16-byte aligned");
  const Epilogue e = device_epilogue(epilogue, y, y_fp32, M, qw.N, "quant_gemm");
  launch_quant_decode(reinterpret_cast<const __half*>(x), qw, e, stream);
}

}  // namespace qg::cuda
