// Decode GEMM for M <= 64 tokens: memory-bound, so the goal is to stream W once at full HBM
// bandwidth. Each CTA owns 32 rows of W; its 8 warps split K and meet in shared memory.
// Every lane loads 16 contiguous bytes of a W row straight into registers and feeds them to
// mma.sync as the B fragment: the K order inside each 32-wide slice is permuted (the same way
// for X and W, so the dot products are unchanged) so that one 16-byte load is exactly the
// fragment data of two m16n8k16 steps. No shared-memory staging, no ldmatrix; every 16 tokens
// are one A operand (kMBlocks of them), so each W fragment feeds kMBlocks mma. Launched
// chained (chained_launch.cuh): the first W bytes are prefetched into L2 before the wait.
// With kNorm (gemm_f16_layer_norm, up to 16 tokens) X is the input of a LayerNorm: every CTA
// takes the rows' statistics itself, in the LayerNorm kernel's order (layer_norm_math.cuh),
// normalises its X fragments as they arrive, and writes its share of the normalised rows, so
// the result is layer_norm then this kernel, bit for bit, in one launch instead of two.
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/half_vector.cuh"
#include "cuda/layer_norm_math.cuh"

namespace qg::cuda {
namespace {

using tiles::Epilogue;

constexpr int kWarps = 8;            // K-split inside a CTA
constexpr int kNFrags = 4;           // n8 fragments per CTA: 32 rows of W
constexpr int kRowsPerCta = kNFrags * 8;
constexpr int kSliceK = 64;          // K consumed per warp per step (two 16-byte loads per row)
constexpr int kPrefetchSteps = 2;    // CTA steps of W prefetched to L2 before the chain wait

template <int kMBlocks>
struct SkinnyRegs {
  // w[j][h] = W[n0 + 8j + lane/4][k + 32h + 8(lane%4) .. +8]  (fragment j, half slice h)
  uint4 w[kNFrags][2];
  // x[b][r][h] = X[16b + 8r + lane/4][same k]  (16-row block b, row half r)
  uint4 x[kMBlocks][2][2];
};

/// The input LayerNorm of a kNorm launch: x is its input; `normed` receives LayerNorm(x).
struct SkinnyNorm {
  const __half* gamma = nullptr;
  const __half* beta = nullptr;
  float eps = 0.0f;
  __half* normed = nullptr;
};

constexpr int kNormMaxRows = 16;  // kNorm: one 16-row block
static_assert(kGemmDecodeMaxM <= kNormMaxRows, "gemm_f16_layer_norm's rows fit one row block");

// ---- CUDA kernels ----

/// Fetches the 128-byte line at p into L2 (no register result, no ordering).
__device__ __forceinline__ void prefetch_l2(const __half* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

/// 16-byte load that skips L1 allocation: W is read exactly once, X should keep the L1.
__device__ __forceinline__ uint4 load_streaming(const __half* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int kMBlocks>
__device__ __forceinline__ void load_slice(SkinnyRegs<kMBlocks>& r, const __half* __restrict__ x,
                                           const __half* __restrict__ w, const Epilogue& e,
                                           std::int64_t n0, std::int64_t k, std::int64_t K) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const std::int64_t kk = k + 32 * h + 8 * t;
    const bool k_ok = kk < K;  // K % 8 == 0: a 16-byte chunk is all in or all out
#pragma unroll
    for (int j = 0; j < kNFrags; ++j) {
      const std::int64_t n = n0 + 8 * j + g;
      r.w[j][h] = (k_ok && n < e.N) ? load_streaming(w + n * K + kk) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int b = 0; b < kMBlocks; ++b) {
#pragma unroll
      for (int rb = 0; rb < 2; ++rb) {
        const std::int64_t m = 16 * b + 8 * rb + g;
        r.x[b][rb][h] = (k_ok && m < e.M) ? __ldg(reinterpret_cast<const uint4*>(x + m * K + kk))
                                          : make_uint4(0, 0, 0, 0);
      }
    }
  }
}

/// kNorm: the X fragments of the slice at k turned into LayerNorm(x) (fp16, as the LayerNorm
/// kernel rounds them), with row (r, lane / 4 + 8 r)'s mean and rstd in mean[r], rstd[r]
/// (gamma and beta, 8 KB each at ChatGLM's width, come from L1).
__device__ __forceinline__ void normalize_slice(SkinnyRegs<1>& r, const SkinnyNorm& norm,
                                                std::int64_t k, std::int64_t K,
                                                const float (&mean)[2], const float (&rstd)[2]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const std::int64_t kk = k + 32 * h + 8 * t;
    if (kk >= K) continue;  // zeros beyond K stay zeros (their W is zero too)
    const HalfVec<8> g = *reinterpret_cast<const HalfVec<8>*>(norm.gamma + kk);
    const HalfVec<8> b = *reinterpret_cast<const HalfVec<8>*>(norm.beta + kk);
#pragma unroll
    for (int rb = 0; rb < 2; ++rb) {
      auto& v = *reinterpret_cast<HalfVec<8>*>(&r.x[0][rb][h]);
      v = layer_norm_vector(v, mean[rb], rstd[rb], g, b);
    }
  }
}

template <int kMBlocks>
__device__ __forceinline__ void mma_slice(float (&acc)[kMBlocks][kNFrags][4],
                                          const SkinnyRegs<kMBlocks>& r) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int b = 0; b < kMBlocks; ++b) {
      // Lane (g, t) holds halves 8t..8t+7 of the slice; the first mma step takes 8t..8t+3 as
      // logical k {2t, 2t+1 | 2t+8, 2t+9}, the second takes 8t+4..8t+7.
      const uint4(&lo)[2] = r.x[b][0];
      const uint4(&hi)[2] = r.x[b][1];
      const std::uint32_t a0[4] = {lo[h].x, hi[h].x, lo[h].y, hi[h].y};
      const std::uint32_t a1[4] = {lo[h].z, hi[h].z, lo[h].w, hi[h].w};
#pragma unroll
      for (int j = 0; j < kNFrags; ++j) {
        tiles::mma_16816(acc[b][j], a0, r.w[j][h].x, r.w[j][h].y);
        tiles::mma_16816(acc[b][j], a1, r.w[j][h].z, r.w[j][h].w);
      }
    }
  }
}

/// kNorm: mean and rstd of the rows [0, M) of x ([M, K], K % 8 == 0) into row_mean and
/// row_rstd (zeros for the rows past M, up to kNormMaxRows), formed exactly as the LayerNorm
/// kernel forms them (its 256 threads are this CTA's; layer_norm_math.cuh): per row, each
/// thread folds its vectors t, t + 256, ... from 0, warps fold with xor shuffles, the 8 warp
/// totals are added in order. Every thread of the CTA takes part.
__device__ void layer_norm_statistics(const __half* __restrict__ x, std::int64_t M, std::int64_t K,
                                      float eps, float* row_mean, float* row_rstd) {
  constexpr int kThreads = kWarps * 32;
  __shared__ float scratch[kWarps][kNormMaxRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t units = K / 8;
  const float cols = static_cast<float>(K);
  // Each warp's partial of every row, from step(partial, value, row) folded from 0.
  const auto warp_partials = [&](auto&& step) {
#pragma unroll 4
    for (int m = 0; m < M; ++m) {
      const auto* row = reinterpret_cast<const HalfVec<8>*>(x + m * K);
      float part = 0.0f;
      for (std::int64_t i = threadIdx.x; i < units; i += kThreads) {
        const HalfVec<8> v = row[i];
#pragma unroll
        for (int k = 0; k < 8; ++k) part = step(part, __half2float(v.v[k]), m);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (lane == 0) scratch[warp][m] = part;
    }
    __syncthreads();
  };
  // The block total of row threadIdx.x (< M).
  const auto row_total = [&] {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += scratch[w][threadIdx.x];
    return total;
  };
  warp_partials([](float acc, float v, int) { return acc + v; });
  if (threadIdx.x < kNormMaxRows) {
    row_mean[threadIdx.x] = threadIdx.x < M ? layer_norm_mean(row_total(), cols) : 0.0f;
  }
  __syncthreads();  // row_mean is read below; scratch is written again
  warp_partials(
      [&](float acc, float v, int m) { return layer_norm_square_add(acc, v, row_mean[m]); });
  if (threadIdx.x < kNormMaxRows) {
    row_rstd[threadIdx.x] = threadIdx.x < M ? layer_norm_rstd(row_total(), cols, eps) : 0.0f;
  }
  __syncthreads();
}

/// kNorm: this CTA's share of LayerNorm(x) (vectors [v0, v1) of every row) into norm.normed.
__device__ void write_normed_share(const __half* __restrict__ x, const SkinnyNorm& norm,
                                   std::int64_t M, std::int64_t K, const float* row_mean,
                                   const float* row_rstd) {
  const std::int64_t units = K / 8, per = (units + gridDim.x - 1) / gridDim.x;
  const std::int64_t v0 = blockIdx.x * per, v1 = v0 + per < units ? v0 + per : units;
  if (v1 <= v0) return;
  const std::int64_t width = v1 - v0;
  for (std::int64_t c = threadIdx.x; c < M * width; c += kWarps * 32) {
    const std::int64_t m = c / width, i = v0 + c % width;
    const HalfVec<8> v = reinterpret_cast<const HalfVec<8>*>(x + m * K)[i];
    const HalfVec<8> g = reinterpret_cast<const HalfVec<8>*>(norm.gamma)[i];
    const HalfVec<8> b = reinterpret_cast<const HalfVec<8>*>(norm.beta)[i];
    reinterpret_cast<HalfVec<8>*>(norm.normed + m * K)[i] =
        layer_norm_vector(v, row_mean[m], row_rstd[m], g, b);
  }
}

// kNorm needs about 170 registers, so one CTA an SM (plain: 128, two): held to 128 it spills
// in the main loop (the normalisation of a slice while the next one is in flight). Its CTA
// still keeps about 32-64 KB of W in flight an SM, near what the bandwidth needs.
template <int kMBlocks, bool kNorm>
__global__ void __launch_bounds__(kWarps * 32)
    gemm_skinny_kernel(const __half* __restrict__ x, const __half* __restrict__ w, Epilogue e,
                       std::int64_t K, const SkinnyNorm norm) {
  __shared__ float partial[kWarps][kNFrags][32][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kRowsPerCta;

  float acc[kMBlocks][kNFrags][4] = {};
  // Warps interleave over K so that the CTA reads each W row front to back together.
  std::int64_t k = static_cast<std::int64_t>(warp) * kSliceK;
  constexpr std::int64_t kStep = kWarps * kSliceK;
  // Chained launch: while the previous kernel drains, pull the first kPrefetchSteps steps of
  // this CTA's W rows into L2 (a prefetch cannot return stale data, so this is safe even if
  // an earlier kernel of the stream writes W), then wait for X.
  chain_release();
  {
    constexpr int kLinesPerRow = kPrefetchSteps * kStep * 2 / 128;
    for (int i = threadIdx.x; i < kRowsPerCta * kLinesPerRow; i += kWarps * 32) {
      const std::int64_t n = n0 + i / kLinesPerRow, kk = (i % kLinesPerRow) * 64;
      if (n < e.N && kk < K) prefetch_l2(w + n * K + kk);
    }
  }
  chain_wait();
  if constexpr (kMBlocks == 1) {
    // Few registers per slice: the next slice's loads go out before this slice's mma.
    SkinnyRegs<1> cur;
    if (k < K) load_slice(cur, x, w, e, n0, k, K);
    float mean[2] = {0.0f, 0.0f}, rstd[2] = {0.0f, 0.0f};
    if constexpr (kNorm) {
      // The rows' statistics while the first slice is in flight, then this CTA's share of the
      // normalised rows.
      __shared__ float row_mean[kNormMaxRows], row_rstd[kNormMaxRows];
      layer_norm_statistics(x, e.M, K, norm.eps, row_mean, row_rstd);
      write_normed_share(x, norm, e.M, K, row_mean, row_rstd);
      const int g = lane / 4;
      mean[0] = row_mean[g];
      mean[1] = row_mean[g + 8];
      rstd[0] = row_rstd[g];
      rstd[1] = row_rstd[g + 8];
    }
    for (; k < K; k += kStep) {
      SkinnyRegs<1> next;
      if (k + kStep < K) load_slice(next, x, w, e, n0, k + kStep, K);
      if constexpr (kNorm) normalize_slice(cur, norm, k, K, mean, rstd);
      mma_slice(acc, cur);
      cur = next;
    }
  } else {
    static_assert(!kNorm, "the fused LayerNorm takes up to 16 rows");
    for (; k < K; k += kStep) {
      SkinnyRegs<kMBlocks> cur;
      load_slice(cur, x, w, e, n0, k, K);
      mma_slice(acc, cur);
    }
  }

  // Sum the warps' K-partials one 16-row block at a time (keeps shared memory at 16 KiB).
  const int j = threadIdx.x / 32;
#pragma unroll
  for (int b = 0; b < kMBlocks; ++b) {
    if (b > 0) __syncthreads();  // the previous block's sums were read
#pragma unroll
    for (int f = 0; f < kNFrags; ++f)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][f][lane][r] = acc[b][f][r];
    __syncthreads();
    if (threadIdx.x < kNFrags * 32) {
      float sum[4] = {};
#pragma unroll
      for (int v = 0; v < kWarps; ++v)
#pragma unroll
        for (int r = 0; r < 4; ++r) sum[r] += partial[v][j][lane][r];
      const std::int64_t row = 16 * b + lane / 4;
      const std::int64_t col = n0 + 8 * j + (lane % 4) * 2;
      tiles::store_pair(e, row, col, sum[0], sum[1]);
      tiles::store_pair(e, row + 8, col, sum[2], sum[3]);
    }
  }
}

/// One CTA per 32 rows of W.
dim3 skinny_grid(const Epilogue& e) {
  const std::int64_t ctas = (e.N + kRowsPerCta - 1) / kRowsPerCta;
  QG_CHECK(ctas <= 0x7fffffff, "gemm_f16: N = ", e.N, " is too large for one launch");
  return dim3(static_cast<unsigned>(ctas));
}

}  // namespace

// ---- kernel launcher ----

void launch_gemm_skinny(const __half* x, const __half* w, const Epilogue& e, std::int64_t K,
                        cudaStream_t stream) {
  auto* kernel = e.M <= 16   ? gemm_skinny_kernel<1, false>
                 : e.M <= 32 ? gemm_skinny_kernel<2, false>
                             : gemm_skinny_kernel<4, false>;
  launch_chained(kernel, skinny_grid(e), dim3(kWarps * 32), 0, stream, x, w, e, K, SkinnyNorm{});
}

void launch_gemm_skinny_layer_norm(const __half* x, const __half* gamma, const __half* beta,
                                   float eps, __half* normed, const __half* w, const Epilogue& e,
                                   std::int64_t K, cudaStream_t stream) {
  SkinnyNorm norm;
  norm.gamma = gamma;
  norm.beta = beta;
  norm.eps = eps;
  norm.normed = normed;
  launch_chained(gemm_skinny_kernel<1, true>, skinny_grid(e), dim3(kWarps * 32), 0, stream, x, w, e,
                 K, norm);
}

}  // namespace qg::cuda
