// FlashAttention-2 style backward of the training attention (include/qinggeng/cuda/
// attention_train.h), GLM mask, packed sequences, fp16 in and out, fp32 inside.
//
//   1. prepare: D[t, h] = dout[t, h] . out[t, h]; the per-query-tile counters of step 2 are
//      zeroed (with the separate-pass dq reduction: the fp32 dq accumulators instead).
//   2. main:    one CTA per (head, sequence, block of kKeys keys), one warp per 16 keys. K and V
//      of the block stay in shared memory; the query tiles that see any of its keys (all of
//      them when the block starts inside the GLM prefix, else those from the block on) stream
//      through a double-buffered cp.async pipeline with their dout rows, lse and D. Per tile,
//      each warp computes for its 16 keys, in registers:
//          P^T = exp(K Q^T * scale - lse)          (the mma accumulators, packed to fp16 A
//          dV += P^T dO                             fragments without leaving registers)
//          dP^T = V dO^T,  dS^T = P^T (dP^T - D)
//          dK += dS^T Q
//      and writes dS^T to shared memory, from which all warps form dQ = dS K for the tile
//      (warp tiles of up to 32 x 32, dS read with ldmatrix.trans). dK and dV go straight to
//      the k and v slices of dqkv when the CTA is done.
//   3. dq: the key blocks that see a query tile reduce their dQ tiles through fp32
//      accumulators in the workspace, with per-tile counters: the first block to arrive
//      stores, the others wait for that store and add with atomics, the last one converts the
//      tile to fp16 into the q slices of dqkv (a tile seen by one block only is written
//      directly). No pass over the whole accumulator array is needed. (The separate-pass
//      reduction, kept as a test and benchmark reference, zeroes the accumulators in step 1,
//      adds every tile with atomics and converts them in a kernel of its own.)
// dq is not bit-for-bit deterministic (neither was the kernel this replaced): the fp32 atomic
// additions of the key blocks land in any order. dk and dv are deterministic.
//
// Tile configurations: 128 keys x 64 queries with 8 warps (155 KiB of shared memory at
// head_dim 128: sm_80 and sm_90), or 64 keys x 32 queries with 4 warps (74 KiB: sm_86/89 at
// head_dim 128). The 128-key CTAs halve the dq atomics per key and double the queries per
// shared-memory tile compared with 64-key ones. Measured on H100 at ChatGLM's shape (32 heads
// x 128, GLM prefix = half): 4 x 512 tokens 0.26 ms (103 TFLOP/s of visible pairs), 2 x 1024
// 0.42 ms (129 TFLOP/s), 1.3x the 64-key, 32-query, 4-warp kernel this replaced. At 255
// registers and 8 warps per SM the kernel is latency-bound (ncu: 0.67 instructions a cycle).
// Fragment layouts follow the forward kernel (attention_prefill.cu): mma.sync m16n8k16 with
// operands from padded shared tiles via ldmatrix (.trans for operands stored k-major).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cuda/attention_paths.h"
#include "cuda/attention_tiles.cuh"
#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/glm_rotary.cuh"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
// Shared tiles pad each row by 16 bytes: the eight row addresses of an ldmatrix phase (and the
// 4-byte dS^T stores of a warp) then fall in distinct banks, while every fragment address is
// a per-lane base plus a compile-time offset (an XOR swizzle would keep one register per
// offset alive across the query loop).
constexpr int kPad = 8;

/// One CTA's tiling: kKeys keys (16 per warp) against streamed tiles of kQueries queries.
template <int kHeadDim, int kKeysPerCta, int kQueriesPerTile>
struct BackwardTiles {
  static constexpr int D = kHeadDim, kKeys = kKeysPerCta, kQueries = kQueriesPerTile;
  static constexpr int kWarps = kKeys / 16, kThreads = kWarps * 32;
  // dQ (kQueries x D, k = kKeys): a kDqWarpsM x kDqWarpsN grid of warp tiles.
  static constexpr int kDqWarpsN = std::min(std::min(4, D / 16), kWarps);
  static constexpr int kDqWarpsM = kWarps / kDqWarpsN;
  static constexpr int kDqRows = kQueries / kDqWarpsM, kDqCols = D / kDqWarpsN;
  // Shared memory (halves, rows padded by kPad): K, V [kKeys][D]; two stages of Q and dout
  // [kQueries][D]; dS^T [kKeys][kQueries]; then floats: two stages of lse and D [kQueries];
  // two ints.
  static constexpr int kRow = D + kPad, kSRow = kQueries + kPad;
  static constexpr int kHalves = 2 * kKeys * kRow + 4 * kQueries * kRow + kKeys * kSRow;
  static constexpr int kSmemBytes = kHalves * 2 + 4 * kQueries * 4 + 16;

  static_assert(kKeys % kQueries == 0, "query tiles must align with key blocks");
  static_assert(kDqRows % 16 == 0 && kDqCols % 16 == 0, "dQ warp tiles are whole x4 loads");
  static_assert(2 * kQueries <= kThreads, "one thread per prefetched lse / D value");
};

// Every query tile of the counter reduction: arrivals (tickets), the first arrival's store
// flag, and finished contributions. Indexed by the tile's first row * heads + head.
struct TileCounters {
  int arrived, stored, finished, unused;
};

struct BackwardArgs {
  TrainAttentionBatch b;
  const __half* qkv;
  const __half* dout;
  const float* lse;
  const float* dvec;
  int heads;
  float scale_log2, scale;
  float* dq_acc;           // [T, heads, D] fp32
  TileCounters* counters;  // [T * heads], or null for the separate-pass reduction
  __half* dqkv;
};

// The rotary whose inverse dq and dk leave with (null positions: none); a kernel argument of
// its own, which the kernels without the rotary never read.
struct InverseRotary {
  const int* positions;
  const int* block_positions;
  RotaryFreqs freqs;
};

std::size_t align256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- CUDA kernels ----

/// Eight fp32 dq accumulators from `from` times `scale`, rounded to fp16, read through L2 (other
/// blocks added to them with atomics).
__device__ __forceinline__ HalfVec<8> scaled_half8(const float* from, float scale) {
  const float4 x = __ldcg(reinterpret_cast<const float4*>(from)),
               y = __ldcg(reinterpret_cast<const float4*>(from) + 1);
  const __half2 h[4] = {
      __floats2half2_rn(x.x * scale, x.y * scale), __floats2half2_rn(x.z * scale, x.w * scale),
      __floats2half2_rn(y.x * scale, y.y * scale), __floats2half2_rn(y.z * scale, y.w * scale)};
  return *reinterpret_cast<const HalfVec<8>*>(h);
}

/// Turns (x1 at column `col` of a head, in the first quarter of its half; x2 at col + D / 4),
/// already rounded to fp16 as the unfused step stores them, back by row `row`'s rotary angle:
/// what glm_rotary_qkv(..., inverse = true) then does to the stored values, bit for bit.
template <int D>
__device__ __forceinline__ void inverse_rotate(const InverseRotary& a, std::int64_t row, int col,
                                               __half& x1, __half& x2) {
  const int pos = col < D / 2 ? a.positions[row] : a.block_positions[row];
  float c, s;
  rotary_cos_sin(pos, a.freqs.inv_freq[col % (D / 4)], -1.0f, c, s);
  rotate_pair(__half2float(x1), __half2float(x2), c, s, x1, x2);
}

/// The q slice of dqkv for the rows i < kRows of a tile with first + i < end (row i at dq_base +
/// i * row_stride), from the tile's fp32 accumulators (row i at acc_base + i * acc_stride) times
/// `scale`, by `threads` threads from `tid`; with kRotate inverse-rotated by `rotary` (row i's
/// position at first_row + i). Each thread converts 16-byte chunks, or pairs of them D / 4
/// columns apart.
template <int D, int kRows, bool kRotate>
__device__ __forceinline__ void convert_dq_rows(float scale, const InverseRotary& rotary,
                                                const float* acc_base, std::int64_t acc_stride,
                                                __half* dq_base, std::int64_t row_stride,
                                                std::int64_t first_row, int first, int end, int tid,
                                                int threads) {
  constexpr int kChunks = D / 8, kQuarterChunks = D / 32;
  constexpr int kUnits = kRotate ? kChunks / 2 : kChunks;  // per row
  for (int c = tid; c < kRows * kUnits; c += threads) {
    const int row = c / kUnits, u = c % kUnits;
    if (first + row >= end) break;
    const int chunk = kRotate ? u / kQuarterChunks * 2 * kQuarterChunks + u % kQuarterChunks : u;
    const float* from = acc_base + row * acc_stride + chunk * 8;
    __half* to = dq_base + row * row_stride + chunk * 8;
    HalfVec<8> x1 = scaled_half8(from, scale);
    if constexpr (kRotate) {
      HalfVec<8> x2 = scaled_half8(from + D / 4, scale);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        inverse_rotate<D>(rotary, first_row + row, chunk * 8 + k, x1.v[k], x2.v[k]);
      }
      *reinterpret_cast<HalfVec<8>*>(to + D / 4) = x2;
    }
    *reinterpret_cast<HalfVec<8>*>(to) = x1;
  }
}

/// D[t, h] = dout[t, h] . out[t, h] with D / 8 threads per (row, head), one 16-byte chunk each;
/// zeroes the row's tile counters (when given) and fp32 dq accumulators (when given).
template <int D>
__global__ void prepare_kernel(const __half* out, const __half* dout, std::int64_t pairs,
                               float* dvec, TileCounters* counters, float* dq_acc) {
  chain_release();
  chain_wait();
  constexpr int kLanes = D / 8;
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t pair = i / kLanes;
  const int chunk = static_cast<int>(i % kLanes);
  const bool valid = pair < pairs;
  float acc = 0.0f;
  if (valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(out + pair * D + chunk * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(dout + pair * D + chunk * 8);
    const __half2* o2 = reinterpret_cast<const __half2*>(&o);
    const __half2* d2 = reinterpret_cast<const __half2*>(&d);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 of = __half22float2(o2[k]), df = __half22float2(d2[k]);
      acc += of.x * df.x + of.y * df.y;
    }
    if (dq_acc != nullptr) {
      float4* z = reinterpret_cast<float4*>(dq_acc + pair * D + chunk * 8);
      z[0] = z[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (valid && chunk == 0) {
    dvec[pair] = acc;
    if (counters != nullptr) counters[pair] = TileCounters{0, 0, 0, 0};
  }
}

/// Separate-pass reduction: the q slices of dqkv = dq_acc * scale (inverse-rotated when
/// rotary.positions is set); a block converts kFinishRows rows of one head (blockIdx.y).
constexpr int kFinishRows = 32, kFinishThreads = 256;

template <int D>
__global__ void finish_kernel(const BackwardArgs a, const InverseRotary rotary, int tokens) {
  chain_release();
  chain_wait();
  const int t0 = static_cast<int>(blockIdx.x) * kFinishRows, head = static_cast<int>(blockIdx.y);
  const std::int64_t acc_stride = static_cast<std::int64_t>(a.heads) * D,
                     row_stride = 3 * acc_stride;
  const float* acc = a.dq_acc + t0 * acc_stride + head * D;
  __half* dq = a.dqkv + t0 * row_stride + head * 3 * D;
  const int tid = static_cast<int>(threadIdx.x);
  if (rotary.positions != nullptr) {
    convert_dq_rows<D, kFinishRows, true>(a.scale, rotary, acc, acc_stride, dq, row_stride, t0, t0,
                                          tokens, tid, kFinishThreads);
  } else {
    convert_dq_rows<D, kFinishRows, false>(a.scale, rotary, acc, acc_stride, dq, row_stride, t0, t0,
                                           tokens, tid, kFinishThreads);
  }
}

/// Loads kRows rows of D halves (row r at base + (first + r) * stride) into a padded tile;
/// rows at or past `limit` are zero-filled.
template <int D, int kRows, int kThreads>
__device__ __forceinline__ void load_rows(__half* tile, const __half* base, std::int64_t stride,
                                          int first, int limit) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "whole copy rounds");
#pragma unroll
  for (int round = 0; round < kRows * kChunks / kThreads; ++round) {
    const int c = round * kThreads + static_cast<int>(threadIdx.x);
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = first + row < limit;
    const __half* from =
        valid ? base + static_cast<std::int64_t>(first + row) * stride + chunk * 8 : base;
    attn::cp_async_16(tile + row * (D + kPad) + chunk * 8, from, valid);
  }
}

// Fragment loads from padded tiles of kWidth halves per row.

/// A-operand fragments (rows row0..row0+15, k step kk) of a tile stored [m][k].
template <int kWidth>
__device__ __forceinline__ void load_a_rows(std::uint32_t (&a)[4], const __half* tile, int row0,
                                            int kk, int lane) {
  const int row = row0 + (lane % 8) + ((lane / 8) % 2) * 8;
  attn::ldmatrix_x4(a, tile + row * (kWidth + kPad) + kk * 16 + (lane / 16) * 8);
}

/// A-operand fragments (rows m0..m0+15, k step kk) of a tile stored k-major ([k][m]).
template <int kWidth>
__device__ __forceinline__ void load_a_kmajor(std::uint32_t (&a)[4], const __half* tile, int m0,
                                              int kk, int lane) {
  const int row = kk * 16 + (lane % 8) + (lane / 16) * 8;
  attn::ldmatrix_x4_trans(a, tile + row * (kWidth + kPad) + m0 + ((lane / 8) % 2) * 8);
}

/// B-operand fragments of two n-frags (columns n0..n0+15 of B = tile^T, k step kk) when the
/// tile stores B's columns as rows (n-major, k contiguous): non-transposed ldmatrix.
template <int kWidth>
__device__ __forceinline__ void load_b_rows(std::uint32_t (&b)[4], const __half* tile, int n0,
                                            int kk, int lane) {
  const int row = n0 + (lane % 8) + (lane / 16) * 8;
  attn::ldmatrix_x4(b, tile + row * (kWidth + kPad) + kk * 16 + ((lane / 8) % 2) * 8);
}

/// B-operand fragments of two n-frags (columns col0..col0+15, k step kk) when the tile stores
/// B k-major (rows = k): transposed ldmatrix.
template <int kWidth>
__device__ __forceinline__ void load_b_kmajor(std::uint32_t (&b)[4], const __half* tile, int col0,
                                              int kk, int lane) {
  const int row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
  attn::ldmatrix_x4_trans(b, tile + row * (kWidth + kPad) + col0 + (lane / 16) * 8);
}

/// acc[16 keys x kQueries] = rows [row0, row0 + 16) of `key_tile` times the rows of
/// `query_tile` transposed (both [rows][D], k = D): S^T = K Q^T and dP^T = V dO^T.
template <int D, int kQueries>
__device__ __forceinline__ void keys_times_queries(float (&acc)[kQueries / 8][4],
                                                   const __half* key_tile, int row0,
                                                   const __half* query_tile, int lane) {
#pragma unroll
  for (int j = 0; j < kQueries / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    std::uint32_t a[4];
    load_a_rows<D>(a, key_tile, row0, kk, lane);
#pragma unroll
    for (int np = 0; np < kQueries / 16; ++np) {
      std::uint32_t b[4];
      load_b_rows<D>(b, query_tile, np * 16, kk, lane);
      attn::mma_16816_pair(acc, np, a, b);
    }
  }
}

/// acc[16 keys x D] += m (16 keys x kQueries as packed fp16 pairs of the accumulator layout:
/// m[j][h] = rows g + 8h, queries 8j + 2t, +1) times `query_tile` ([kQueries][D], k =
/// queries): dV += P^T dO and dK += dS^T Q.
template <int D, int kQueries>
__device__ __forceinline__ void accumulate_keys(float (&acc)[D / 8][4],
                                                const std::uint32_t (&m)[kQueries / 8][2],
                                                const __half* query_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < kQueries / 16; ++kk) {
    const std::uint32_t a[4] = {m[2 * kk][0], m[2 * kk][1], m[2 * kk + 1][0], m[2 * kk + 1][1]};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t b[4];
      load_b_kmajor<D>(b, query_tile, dp * 16, kk, lane);
      attn::mma_16816_pair(acc, dp, a, b);
    }
  }
}

__device__ __forceinline__ float2 unpack_half2(std::uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

/// dst[0..1] += (v0, v1) in fp32 global memory: one vector atomic on sm_90, two elsewhere.
__device__ __forceinline__ void atomic_add_pair(float* dst, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v0, v1));
#else
  atomicAdd(dst, v0);
  atomicAdd(dst + 1, v1);
#endif
}

template <class Cfg, bool kRotate>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    backward_kernel(const BackwardArgs a, const InverseRotary rotary) {
  chain_release();
  chain_wait();
  constexpr int D = Cfg::D, kKeys = Cfg::kKeys, kQueries = Cfg::kQueries;
  constexpr int kThreads = Cfg::kThreads, kQFrags = kQueries / 8, kDFrags = D / 8;
  constexpr int kDqM = Cfg::kDqRows / 16, kDqN = Cfg::kDqCols / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kStage = kQueries * Cfg::kRow;  // halves of one Q or dout stage
  __half* sK = reinterpret_cast<__half*>(smem_raw);
  __half* sV = sK + kKeys * Cfg::kRow;
  __half* sQ = sV + kKeys * Cfg::kRow;                              // [2][kQueries][kRow]
  __half* sO = sQ + 2 * kStage;                                     // [2][kQueries][kRow] dout
  __half* sS = sO + 2 * kStage;                                     // dS^T [kKeys][kSRow]
  float* sLse = reinterpret_cast<float*>(sS + kKeys * Cfg::kSRow);  // [2][kQueries], log2 domain
  float* sDvec = sLse + 2 * kQueries;                               // [2][kQueries]
  int* sFlags = reinterpret_cast<int*>(sDvec + 2 * kQueries);       // ticket, last arrival

  const int head = blockIdx.x, seq = blockIdx.y, j0 = blockIdx.z * kKeys;
  const int r0 = a.b.row_start[seq], n = a.b.row_start[seq + 1] - r0;
  const int ctx = a.b.context_length[seq];
  if (j0 >= n) return;
  const int tid = threadIdx.x, warp = tid / 32, g = tid % 32 / 4, t = tid % 4;
  const int heads = a.heads;
  const std::int64_t row_stride = 3LL * heads * D,
                     out_stride = static_cast<std::int64_t>(heads) * D;
  const __half* q_base = a.qkv + static_cast<std::int64_t>(r0) * row_stride + head * 3 * D;
  const __half* o_base = a.dout + static_cast<std::int64_t>(r0) * out_stride + head * D;

  load_rows<D, kKeys, kThreads>(sK, q_base + D, row_stride, j0, n);
  load_rows<D, kKeys, kThreads>(sV, q_base + 2 * D, row_stride, j0, n);
  attn::cp_async_commit();

  // Queries that see any key of the block: every query if the block starts in the prefix,
  // else the causal ones from j0 on (kKeys is a multiple of kQueries: tiles stay aligned).
  const int q_first = j0 < ctx ? 0 : j0;
  const int tiles = (n - q_first + kQueries - 1) / kQueries;
  // lse (log2 domain) or D of query q0 + tid (tid < kQueries) or q0 + tid - kQueries.
  const auto row_stat = [&](int q0) {
    const int q = q0 + (tid < kQueries ? tid : tid - kQueries);
    const std::int64_t at = static_cast<std::int64_t>(r0 + q) * heads + head;
    if (tid < kQueries) return q < n ? a.lse[at] * kLog2e : INFINITY;
    return q < n ? a.dvec[at] : 0.0f;
  };
  load_rows<D, kQueries, kThreads>(sQ, q_base, row_stride, q_first, n);
  load_rows<D, kQueries, kThreads>(sO, o_base, out_stride, q_first, n);
  attn::cp_async_commit();
  if (tid < 2 * kQueries) sLse[tid < kQueries ? tid : tid + kQueries] = row_stat(q_first);

  float dk[kDFrags][4], dv[kDFrags][4];
#pragma unroll
  for (int j = 0; j < kDFrags; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.0f;
  }
  const int kw0 = j0 + warp * 16;  // this warp's first key (within the sequence)
  const int dq_row0 = (warp / Cfg::kDqWarpsN) * Cfg::kDqRows;
  const int dq_col0 = (warp % Cfg::kDqWarpsN) * Cfg::kDqCols;

  for (int it = 0; it < tiles; ++it) {
    const int q0 = q_first + it * kQueries, stage = it % 2;
    // Tile `it` (and K, V) landed; every warp is done with tile it - 1, whose buffers the next
    // loads overwrite.
    attn::cp_async_wait<0>();
    __syncthreads();
    const bool has_next = it + 1 < tiles;
    float next_stat = 0.0f;
    if (has_next) {
      const int other = (stage ^ 1) * kStage;
      load_rows<D, kQueries, kThreads>(sQ + other, q_base, row_stride, q0 + kQueries, n);
      load_rows<D, kQueries, kThreads>(sO + other, o_base, out_stride, q0 + kQueries, n);
      attn::cp_async_commit();
      if (tid < 2 * kQueries) next_stat = row_stat(q0 + kQueries);
    }
    const std::int64_t tile_id = static_cast<std::int64_t>(r0 + q0) * heads + head;
    int ticket = 0;
    if (a.counters != nullptr && tid == 0) ticket = atomicAdd(&a.counters[tile_id].arrived, 1);

    // The lane index re-enters every iteration through an empty asm, so the fragment addresses
    // derived from it are recomputed (one add each) rather than hoisted out of the loop, where
    // they would hold registers the accumulators need (ptxas then spills).
    int lane = tid % 32;
    asm volatile("" : "+r"(lane));
    const __half* cQ = sQ + stage * kStage;
    const __half* cO = sO + stage * kStage;
    const float* cLse = sLse + stage * kQueries;
    const float* cD = sDvec + stage * kQueries;
    // This warp's keys see none of the tile: past the sequence, or causal and after it.
    const bool empty = kw0 >= n || (kw0 >= ctx && kw0 > q0 + kQueries - 1);
    if (!empty) {
      float s[kQFrags][4];
      keys_times_queries<D, kQueries>(s, sK, warp * 16, cQ, lane);
      // Every (key, query) of the warp's part of the tile visible: no mask needed.
      const bool full = q0 + kQueries <= n && kw0 + 16 <= n && (kw0 + 16 <= ctx || kw0 + 15 <= q0);
      std::uint32_t ph[kQFrags][2];  // P^T, then dS^T, as fp16 pairs
#pragma unroll
      for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ql = j * 8 + 2 * t, key = kw0 + g + 8 * h;
          float p0 = exp2f(s[j][2 * h] * a.scale_log2 - cLse[ql]);
          float p1 = exp2f(s[j][2 * h + 1] * a.scale_log2 - cLse[ql + 1]);
          if (!full) {
            const int q = q0 + ql;
            const bool key_ok = key < n, causal = key < ctx;
            if (!(key_ok && q < n && (causal || key <= q))) p0 = 0.0f;
            if (!(key_ok && q + 1 < n && (causal || key <= q + 1))) p1 = 0.0f;
          }
          ph[j][h] = attn::pack_half2(p0, p1);
        }
      }
      accumulate_keys<D, kQueries>(dv, ph, cO, lane);  // dV += P^T dO

      float dp[kQFrags][4];
      keys_times_queries<D, kQueries>(dp, sV, warp * 16, cO, lane);  // dP^T = V dO^T
#pragma unroll
      for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ql = j * 8 + 2 * t;
          const float2 p = unpack_half2(ph[j][h]);
          ph[j][h] = attn::pack_half2(p.x * (dp[j][2 * h] - cD[ql]),
                                      p.y * (dp[j][2 * h + 1] - cD[ql + 1]));
        }
      }
      accumulate_keys<D, kQueries>(dk, ph, cQ, lane);  // dK += dS^T Q
#pragma unroll
      for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * 16 + g + 8 * h;
          *reinterpret_cast<std::uint32_t*>(sS + row * Cfg::kSRow + j * 8 + 2 * t) = ph[j][h];
        }
      }
    } else {
      for (int c = lane; c < 16 * kQueries / 8; c += 32) {
        const int row = warp * 16 + c / (kQueries / 8);
        *reinterpret_cast<uint4*>(sS + row * Cfg::kSRow + (c % (kQueries / 8)) * 8) =
            make_uint4(0, 0, 0, 0);
      }
    }
    if (has_next && tid < 2 * kQueries) {
      sLse[(stage ^ 1) * kQueries + (tid < kQueries ? tid : tid + kQueries)] = next_stat;
    }
    if (tid == 0) sFlags[0] = ticket;
    __syncthreads();  // dS^T complete

    // dQ (kQueries x D) = dS K for this tile, kDqRows x kDqCols per warp.
    float acc[kDqM][kDqN][4];
    tiles::zero_warp_tile(acc);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      std::uint32_t af[kDqM][4];
#pragma unroll
      for (int i = 0; i < kDqM; ++i) load_a_kmajor<kQueries>(af[i], sS, dq_row0 + i * 16, kk, lane);
      std::uint32_t bf[kDqN][2];
#pragma unroll
      for (int np = 0; np < kDqN / 2; ++np) {
        std::uint32_t r[4];
        load_b_kmajor<D>(r, sK, dq_col0 + np * 16, kk, lane);
        tiles::set_b_pair(bf, np, r);
      }
      tiles::mma_warp_tile(acc, af, bf);
    }

    // Reduce the tile into dq.
    float* acc_base = a.dq_acc + static_cast<std::int64_t>(r0 + q0) * out_stride + head * D;
    const auto add_all = [&] {
      tiles::store_warp_tile(acc, dq_row0, dq_col0, lane,
                             [&](std::int64_t row, std::int64_t col, float v0, float v1) {
                               if (q0 + row < n)
                                 atomic_add_pair(acc_base + row * out_stride + col, v0, v1);
                             });
    };
    if (a.counters == nullptr) {
      add_all();
      continue;
    }
    // Key blocks that see this tile: those starting at or before max(ctx - 1, q0).
    const int seen_by = min(max(ctx - 1, q0) / kKeys + 1, (n + kKeys - 1) / kKeys);
    __half* dq_base = a.dqkv + static_cast<std::int64_t>(r0 + q0) * row_stride + head * 3 * D;
    if (seen_by == 1 && !kRotate) {  // (with the rotary: the general path)
      tiles::store_warp_tile(acc, dq_row0, dq_col0, lane,
                             [&](std::int64_t row, std::int64_t col, float v0, float v1) {
                               if (q0 + row < n) {
                                 *reinterpret_cast<__half2*>(dq_base + row * row_stride + col) =
                                     __floats2half2_rn(v0 * a.scale, v1 * a.scale);
                               }
                             });
      continue;
    }
    TileCounters& counter = a.counters[tile_id];
    ticket = sFlags[0];
    if (ticket == 0) {
      tiles::store_warp_tile(
          acc, dq_row0, dq_col0, lane, [&](std::int64_t row, std::int64_t col, float v0, float v1) {
            if (q0 + row < n) {
              *reinterpret_cast<float2*>(acc_base + row * out_stride + col) = make_float2(v0, v1);
            }
          });
    } else {
      if (tid == 0) {
        // The first arrival took its ticket before this CTA and waits on nothing: this ends.
        while (*const_cast<volatile int*>(&counter.stored) == 0) __nanosleep(64);
        __threadfence();
      }
      __syncthreads();
      add_all();
    }
    __syncthreads();
    if (tid == 0) {
      __threadfence();  // this CTA's stores or atomics, before the flag and the count
      if (ticket == 0) atomicExch(&counter.stored, 1);
      sFlags[1] = atomicAdd(&counter.finished, 1) == seen_by - 1;
      __threadfence();
    }
    __syncthreads();
    if (sFlags[1]) {  // last contribution: the tile is complete, convert it
      convert_dq_rows<D, kQueries, kRotate>(a.scale, rotary, acc_base, out_stride, dq_base,
                                            row_stride, r0 + q0, q0, n, tid, kThreads);
    }
  }

  // dK (times the softmax scale; inverse-rotated with kRotate) and dV of this
  // warp's keys into the k and v slices. With the rotary, fragment j in the first quarter of
  // a half holds the x1 columns whose x2 partners (D / 4 columns on) are fragment j + D / 32.
  constexpr int kPartner = D / 32;
#pragma unroll
  for (int j = 0; j < kDFrags; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = kw0 + g + 8 * h;
      if (key >= n) continue;
      __half* row =
          a.dqkv + static_cast<std::int64_t>(r0 + key) * row_stride + head * 3 * D + j * 8 + 2 * t;
      if constexpr (!kRotate) {
        *reinterpret_cast<__half2*>(row + D) =
            __floats2half2_rn(dk[j][2 * h] * a.scale, dk[j][2 * h + 1] * a.scale);
      } else if (j * 8 % (D / 2) < D / 4) {
        const int p = (j + kPartner) % kDFrags;
        __half2 x1 = __floats2half2_rn(dk[j][2 * h] * a.scale, dk[j][2 * h + 1] * a.scale);
        __half2 x2 = __floats2half2_rn(dk[p][2 * h] * a.scale, dk[p][2 * h + 1] * a.scale);
        inverse_rotate<D>(rotary, r0 + key, j * 8 + 2 * t, x1.x, x2.x);
        inverse_rotate<D>(rotary, r0 + key, j * 8 + 2 * t + 1, x1.y, x2.y);
        *reinterpret_cast<__half2*>(row + D) = x1;
        *reinterpret_cast<__half2*>(row + D + D / 4) = x2;
      }
      *reinterpret_cast<__half2*>(row + 2 * D) = __floats2half2_rn(dv[j][2 * h], dv[j][2 * h + 1]);
    }
  }
}

// ---- kernel launchers ----

std::atomic<AttentionBackwardTiles> forced_tiles{AttentionBackwardTiles::Auto};
std::atomic<AttentionBackwardDq> forced_dq{AttentionBackwardDq::TileCounters};

/// Largest dynamic shared memory one CTA may opt in to on the current device (cached).
int max_shared_per_block() {
  static thread_local int cached_device = -1, cached_bytes = 0;
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  if (device != cached_device) {
    QG_CUDA_CHECK(
        cudaDeviceGetAttribute(&cached_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cached_device = device;
  }
  return cached_bytes;
}

template <class Cfg>
void launch_tiles(const BackwardArgs& args, const InverseRotary& rotary, cudaStream_t stream) {
  auto* kernel =
      rotary.positions != nullptr ? backward_kernel<Cfg, true> : backward_kernel<Cfg, false>;
  opt_in_shared_memory(reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  // Key blocks vary slowest: the first blocks of every sequence, which see the most query
  // tiles, start first and the short causal-tail blocks fill in behind them.
  const dim3 grid(static_cast<unsigned>(args.heads), static_cast<unsigned>(args.b.num_seqs),
                  static_cast<unsigned>((args.b.max_seq_len + Cfg::kKeys - 1) / Cfg::kKeys));
  launch_chained(kernel, dim3(grid), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, args, rotary);
}

template <int D>
void launch_backward(const BackwardArgs& args, const InverseRotary& rotary, cudaStream_t stream) {
  using Wide = BackwardTiles<D, 128, 64>;
  using Narrow = BackwardTiles<D, 64, 32>;
  if (forced_tiles.load() == AttentionBackwardTiles::Auto &&
      Wide::kSmemBytes <= max_shared_per_block()) {
    launch_tiles<Wide>(args, rotary, stream);
  } else {
    launch_tiles<Narrow>(args, rotary, stream);
  }
}

template <int D>
void run_backward(const __half* out, BackwardArgs args, const InverseRotary& rotary,
                  void* workspace, cudaStream_t stream) {
  const std::int64_t pairs = static_cast<std::int64_t>(args.b.total_tokens) * args.heads;
  const bool separate = forced_dq.load() == AttentionBackwardDq::SeparatePass;
  char* ws = static_cast<char*>(workspace);
  args.dq_acc = reinterpret_cast<float*>(ws);
  float* dvec = reinterpret_cast<float*>(ws + align256(pairs * D * sizeof(float)));
  args.dvec = dvec;
  args.counters = separate
                      ? nullptr
                      : reinterpret_cast<TileCounters*>(ws + align256(pairs * D * sizeof(float)) +
                                                        align256(pairs * sizeof(float)));
  const std::int64_t threads = pairs * (D / 8);
  launch_chained(prepare_kernel<D>, dim3(static_cast<unsigned>((threads + 255) / 256)), dim3(256),
                 0, stream, out, args.dout, pairs, dvec, args.counters,
                 separate ? args.dq_acc : nullptr);
  launch_backward<D>(args, rotary, stream);
  if (separate) {
    const int tokens = args.b.total_tokens;
    launch_chained(finish_kernel<D>,
                   dim3(static_cast<unsigned>((tokens + kFinishRows - 1) / kFinishRows),
                        static_cast<unsigned>(args.heads)),
                   dim3(kFinishThreads), 0, stream, args, rotary, tokens);
  }
}

}  // namespace

namespace attn {

void check_train_attention_args(const TrainAttentionBatch& b, int heads, int head_dim,
                                const char* what) {
  QG_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128, what,
           ": head_dim ", head_dim, " is not supported (16, 32, 64 or 128)");
  QG_CHECK(heads > 0 && b.num_seqs > 0 && b.total_tokens > 0 && b.max_seq_len > 0 &&
               b.row_start != nullptr && b.context_length != nullptr,
           what, ": empty batch or missing row_start / context_length");
  QG_CHECK(b.num_seqs <= 65535 && heads <= 65535, what, ": ", b.num_seqs, " sequences x ", heads,
           " heads exceed one launch grid");
}

}  // namespace attn

// ---- host entry points ----

void force_attention_train_backward(AttentionBackwardTiles tiles, AttentionBackwardDq dq) {
  forced_tiles.store(tiles);
  forced_dq.store(dq);
}

std::size_t attention_train_backward_workspace_bytes(int total_tokens, int heads, int head_dim) {
  const std::size_t pairs = static_cast<std::size_t>(total_tokens) * heads;
  return align256(pairs * head_dim * sizeof(float)) + align256(pairs * sizeof(float)) +
         align256(pairs * sizeof(TileCounters));
}

void attention_train_backward(const __half* qkv, const __half* out, const float* lse,
                              const __half* dout, const TrainAttentionBatch& batch, int heads,
                              int head_dim, __half* dqkv, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream,
                              const TrainRotaryPositions& inverse_rotary) {
  attn::check_train_attention_args(batch, heads, head_dim, "attention_train_backward");
  QG_CHECK(head_dim >= 32, "attention_train_backward: head_dim ", head_dim,
           " is not supported (32, 64 or 128)");
  QG_CHECK(qkv && out && lse && dout && dqkv && workspace,
           "attention_train_backward: null pointer");
  QG_CHECK(aligned16(qkv) && aligned16(out) && aligned16(dout) && aligned16(dqkv) &&
               aligned16(workspace),
           "attention_train_backward: qkv, out, dout, dqkv and workspace must be 16-byte "
           "aligned");
  QG_CHECK(batch.max_seq_len <= 65535 * 64, "attention_train_backward: max_seq_len ",
           batch.max_seq_len, " exceeds one launch grid");
  const std::size_t need =
      attention_train_backward_workspace_bytes(batch.total_tokens, heads, head_dim);
  QG_CHECK(workspace_bytes >= need, "attention_train_backward: workspace of ", workspace_bytes,
           " bytes, need ", need);
  BackwardArgs args{};
  args.b = batch;
  args.qkv = qkv;
  args.dout = dout;
  args.lse = lse;
  args.heads = heads;
  args.scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  args.scale_log2 = args.scale * kLog2e;
  args.dqkv = dqkv;
  QG_CHECK((inverse_rotary.positions == nullptr) == (inverse_rotary.block_positions == nullptr),
           "attention_train_backward: inverse_rotary needs both positions and block_positions");
  InverseRotary rotary{};
  if (inverse_rotary.positions != nullptr) {
    rotary.positions = inverse_rotary.positions;
    rotary.block_positions = inverse_rotary.block_positions;
    rotary.freqs = rotary_freqs(head_dim);
  }
  switch (head_dim) {
    case 32:
      run_backward<32>(out, args, rotary, workspace, stream);
      break;
    case 64:
      run_backward<64>(out, args, rotary, workspace, stream);
      break;
    default:
      run_backward<128>(out, args, rotary, workspace, stream);
      break;
  }
}

}  // namespace qg::cuda
