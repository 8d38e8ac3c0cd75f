// Decode GEMM for M <= 64 tokens: memory-bound, so the goal is to stream W once at full HBM
// bandwidth. Each CTA owns 32 rows of W; its 8 warps split K and meet in shared memory.
// Every lane loads 16 contiguous bytes of a W row straight into registers and feeds them to
// mma.sync as the B fragment: the K order inside each 32-wide slice is permuted (the same way
// for X and W, so the dot products are unchanged) so that one 16-byte load is exactly the
// fragment data of two m16n8k16 steps. No shared-memory staging, no ldmatrix; every 16 tokens
// are one A operand (kMBlocks of them), so each W fragment feeds kMBlocks mma. Launched
// chained (chained_launch.cuh): the first W bytes are prefetched into L2 before the wait.
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"

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

template <int kMBlocks>
__global__ void __launch_bounds__(kWarps * 32)
    gemm_skinny_kernel(const __half* __restrict__ x, const __half* __restrict__ w, Epilogue e,
                       std::int64_t K) {
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
    for (; k < K; k += kStep) {
      SkinnyRegs<1> next;
      if (k + kStep < K) load_slice(next, x, w, e, n0, k + kStep, K);
      mma_slice(acc, cur);
      cur = next;
    }
  } else {
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

}  // namespace

// ---- kernel launcher ----

void launch_gemm_skinny(const __half* x, const __half* w, const Epilogue& e, std::int64_t K,
                        cudaStream_t stream) {
  const std::int64_t ctas = (e.N + kRowsPerCta - 1) / kRowsPerCta;
  QG_CHECK(ctas <= 0x7fffffff, "gemm_f16: N = ", e.N, " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(ctas));
  auto* kernel = e.M <= 16   ? gemm_skinny_kernel<1>
                 : e.M <= 32 ? gemm_skinny_kernel<2>
                             : gemm_skinny_kernel<4>;
  launch_chained(kernel, grid, dim3(kWarps * 32), 0, stream, x, w, e, K);
}

}  // namespace qg::cuda
