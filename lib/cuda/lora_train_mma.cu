// The LoRA training passes on tensor cores (lora_pass::launch_mma_pass, picked by
// LoraTrainKernels::TensorCores; lora_train.cu holds the SIMT passes, the entry points and the
// definition of shrink, outer and expand).
//
// A block owns kCols = 128 columns and a range of tokens, which it streams through shared
// memory in tiles of kTileT = 64 tokens: a cp.async pipeline of [64][128] fp16 tiles of `in`
// (shrink, outer) and `out` (expand), stored MN-major (mma_tiles.cuh), and the tile's rows of
// s in fp32. Each of the four warps owns 16 rows of a tile.
//
//   shrink  s_part[t, r] = sum over the block's columns j of in~[t, j] W(j, r):
//           mma with A = the tile (rows t, k = j), B = W; one partial per column block
//   outer   G[j, r] = sum over the block's tokens t of in~[t, j] s[t, r]:
//           mma with A = the tile read transposed (rows j, k = t), B = s; the warps' sums are
//           added in shared memory, one partial per token block
//   expand  out[t, j] += scale drop'(sum_r s[t, r] W(j, r)): fp32 FMAs in the SIMT pass's order
//
// mma takes fp16 operands, so the fp32 factor and s enter as two fp16 halves, hi = fp16(v) and
// lo = fp16(v - hi), after a power of 2 per rank column that brings the column's largest
// magnitude (over the block's columns for W, its tokens for s) to [2^14, 2^15). Products are
// exact, sums fp32, and the split loses about 2^-22 of the column's largest value: fp32's own
// rounding. Without the scale, LoRA's B (zero at the start, growing slowly) would fall into
// fp16's subnormals. The block undoes the scale when it writes its partial.
//
// Dropout (the input side): a tile's dropped elements are zeroed in shared memory before the
// mmas, and keep_scale = 1 / (1 - p) multiplies the block's partials (the SIMT pass multiplies
// each kept element: the same up to rounding); expand applies the same mask bits to its update.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/half_vector.cuh"
#include "cuda/lora_train_pass.cuh"
#include "cuda/mma_tiles.cuh"
#include "qinggeng/error.h"

namespace qg::cuda::lora_pass {
namespace {

constexpr int kCols = 128;     // columns a block owns
constexpr int kTileT = 64;     // tokens a tile holds
constexpr int kThreads = 128;  // four warps of 16 tile rows
constexpr int kWarps = kThreads / 32;
constexpr int kChunks = kCols / 8;  // 16-byte chunks of a tile row
static_assert(kCols == kThreads, "prepare and the outer's sums give each thread one column");
static_assert((kTileT * kChunks) % kThreads == 0 && kTileT % (kThreads / kChunks) == 0,
              "the SIMT part covers a tile with whole rows of chunks");
static_assert(kTileT == kWarps * 16, "each warp owns 16 tile rows (one mma k step of tokens)");
// Blocks a pass aims for (three an SM of an H100 at rank <= 8: one wave). A constant, so the
// grid, and with it the order in which partials are added, depends on the sizes only.
constexpr int kTargetBlocks = 384;

/// Shared memory of one pass kind at rounded rank kR: the pipeline's stages (in tile, out
/// tile, s rows), then the factor (fp32 [kR][kCols]), its fp16 fragments (shrink), the
/// per-column scales and the scratch of their maxima. The outer's final sum across warps
/// reuses the stages.
template <int kR, bool kShrink, bool kOuter, bool kExpand>
struct Layout {
  static constexpr bool kIn = kShrink || kOuter;
  static constexpr bool kS = kOuter || kExpand;
  static constexpr int kNR = kR / 8;  // n8 fragments across the rank
  static constexpr int kStages = kIn && kExpand ? 2 : 3;
  static constexpr int kInBytes = kIn ? kTileT * kCols * 2 : 0;
  static constexpr int kOutBytes = kExpand ? kTileT * kCols * 2 : 0;
  static constexpr int kSBytes = kS ? kTileT * kR * 4 : 0;
  static constexpr int kStageBytes = kInBytes + kOutBytes + kSBytes;
  static constexpr int kReduceBytes = kOuter ? kWarps * kCols * kR * 4 : 0;
  static constexpr int kPipeBytes = std::max(kStages * kStageBytes, kReduceBytes);
  static constexpr int kFactorBytes = kR * kCols * 4;
  static constexpr int kFragBytes = kShrink ? (kCols / 16) * kNR * 32 * 16 : 0;
  static constexpr int kScaleBytes = 4 * kR * 4 + kWarps * kR * 4;
  static constexpr int kBytes = kPipeBytes + kFactorBytes + kFragBytes + kScaleBytes;
  static_assert(kStageBytes % 16 == 0 && kFactorBytes % 16 == 0, "16-byte aligned parts");
};

// ---- device helpers ----

__device__ __forceinline__ std::uint32_t as_u32(__half2 h) {
  return *reinterpret_cast<std::uint32_t*>(&h);
}

/// The hi / lo fp16 halves of (a, b), packed as mma operand registers (a in the low half).
__device__ __forceinline__ void split_pair(float a, float b, std::uint32_t& hi, std::uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  hi = as_u32(h);
  lo = as_u32(__floats2half2_rn(a - __low2float(h), b - __high2float(h)));
}

/// The power-of-2 exponent that brings magnitude m to [2^14, 2^15): 0 for 0, inf and NaN (they
/// pass through unscaled, so a non-finite value still makes the result non-finite), at most
/// 126 so that the scale and its inverse are normal floats.
__device__ __forceinline__ int split_exponent(float m) {
  if (!(m > 0.0f) || isinf(m)) return 0;
  int e = 0;
  frexpf(m, &e);  // m = f 2^e, f in [0.5, 1)
  return min(15 - e, 126);
}

/// scale[r] = 2^split_exponent(max over the block of |v[r]|) and inv[r] = 1 / scale[r], for
/// r < kR; `scratch` holds kWarps * kR floats. Ends with a block barrier.
template <int kR>
__device__ __forceinline__ void block_split_scales(const float (&v)[kR], float* scratch,
                                                   float* scale, float* inv) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    float m = fabsf(v[r]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) scratch[warp * kR + r] = m;
  }
  __syncthreads();
  if (threadIdx.x < kR) {
    float m = 0.0f;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, scratch[w * kR + threadIdx.x]);
    const int e = split_exponent(m);
    scale[threadIdx.x] = ldexpf(1.0f, e);
    inv[threadIdx.x] = ldexpf(1.0f, -e);
  }
  __syncthreads();
}

// ---- CUDA kernel ----

/// One pass (see the file comment) over columns [128 blockIdx.x, + 128) and tokens
/// [blockIdx.y * p.tokens_per_block, + p.tokens_per_block); kR is the rank rounded up to 8 or 16.
template <int kR, bool kShrink, bool kOuter, bool kExpand>
__global__ void __launch_bounds__(kThreads, kR <= 8 ? 3 : 2) lora_mma_kernel(const PassArgs p) {
  chain_release();
  chain_wait();
  using L = Layout<kR, kShrink, kOuter, kExpand>;
  constexpr int kNR = L::kNR;
  extern __shared__ __align__(128) unsigned char smem[];
  float* factor = reinterpret_cast<float*>(smem + L::kPipeBytes);  // W(j0 + c, r) at [r][c]
  auto* frags = reinterpret_cast<uint4*>(smem + L::kPipeBytes + L::kFactorBytes);
  float* scales = reinterpret_cast<float*>(smem + L::kPipeBytes + L::kFactorBytes + L::kFragBytes);
  float* w_scale = scales;
  float* w_inv = scales + kR;
  float* s_scale = scales + 2 * kR;
  float* s_inv = scales + 3 * kR;
  float* max_scratch = scales + 4 * kR;

  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, c4 = lane % 4;  // mma fragment coordinates
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
  const std::int64_t t_begin = static_cast<std::int64_t>(blockIdx.y) * p.tokens_per_block;
  const std::int64_t t_end = std::min(p.tokens, t_begin + p.tokens_per_block);
  const int tile_count = static_cast<int>((t_end - t_begin + kTileT - 1) / kTileT);
  const bool masked = p.drop.threshold != 0;
  const float drop_scale = masked ? p.drop.keep_scale : 1.0f;  // partials of a masked tile

  auto in_tile = [&](int slot) { return reinterpret_cast<__half*>(smem + slot * L::kStageBytes); };
  auto out_tile = [&](int slot) {
    return reinterpret_cast<__half*>(smem + slot * L::kStageBytes + L::kInBytes);
  };
  auto s_rows = [&](int slot) {  // fp32 [kTileT][kR], zero past the rank and the tokens
    return reinterpret_cast<float*>(smem + slot * L::kStageBytes + L::kInBytes + L::kOutBytes);
  };

  auto load_stage = [&](int slot, int kt) {
    const std::int64_t t0 = t_begin + static_cast<std::int64_t>(kt) * kTileT;
    if constexpr (L::kIn) {
      tiles::copy_mn_tile<kCols, kTileT, kThreads>(in_tile(slot), p.in, t0, t_end, j0, p.width);
    }
    if constexpr (kExpand) {
      tiles::copy_mn_tile<kCols, kTileT, kThreads>(out_tile(slot), p.out, t0, t_end, j0, p.width);
    }
    if constexpr (L::kS) {
      float* rows = s_rows(slot);
      static_assert((kTileT * kR) % kThreads == 0, "every thread copies as many s values");
#pragma unroll
      for (int it = 0; it < kTileT * kR / kThreads; ++it) {
        const int e = it * kThreads + tid;
        const int row = e / kR, r = e % kR;
        const std::int64_t t = t0 + row;
        const bool valid = t < t_end && r < p.rank;
        tiles::cp_async_4(rows + e, valid ? p.s + t * p.rank + r : p.s, valid);
      }
    }
  };

  // While the first tiles load: the factor's columns, the split scales and W's fragments.
  auto prepare = [&] {
    float mine[kR];  // W(j0 + tid, r)
    const std::int64_t j = j0 + tid;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      mine[r] = j < p.width && r < p.rank ? p.w[r * p.w_r + j * p.w_j] : 0.0f;
      factor[r * kCols + tid] = mine[r];
    }
    if constexpr (kShrink) block_split_scales<kR>(mine, max_scratch, w_scale, w_inv);
    if constexpr (kOuter) {
      float m[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) m[r] = 0.0f;
      for (std::int64_t t = t_begin + tid; t < t_end; t += kThreads) {
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          if (r < p.rank) m[r] = fmaxf(m[r], fabsf(p.s[t * p.rank + r]));
        }
      }
      block_split_scales<kR>(m, max_scratch, s_scale, s_inv);
    }
    __syncthreads();  // factor[] complete
    if constexpr (kShrink) {
      // B fragments of W for k step ks (columns 16 ks ..) and n8 block nf, lane l:
      // {hi(W(2c, g), W(2c+1, g)), hi(W(2c+8, g), W(2c+9, g)), the same lo}, c = l % 4, g = l / 4.
      for (int e = tid; e < (kCols / 16) * kNR * 32; e += kThreads) {
        const int l = e % 32, nf = (e / 32) % kNR, ks = e / (32 * kNR);
        const int r = nf * 8 + l / 4, col = ks * 16 + 2 * (l % 4);
        const float sc = w_scale[r];
        const float* f = factor + r * kCols + col;
        uint4 frag;
        split_pair(f[0] * sc, f[1] * sc, frag.x, frag.z);
        split_pair(f[8] * sc, f[9] * sc, frag.y, frag.w);
        frags[e] = frag;
      }
      __syncthreads();
    }
  };

  float acc_g[kCols / 16][kNR][4];  // outer: this warp's share of G over the block's columns
  tiles::zero_warp_tile(acc_g);

  int tile = 0;  // the tile compute() works on (tiles are computed in order)
  auto compute = [&](int slot) {
    const std::int64_t t0 = t_begin + static_cast<std::int64_t>(tile++) * kTileT;
    __half* in = L::kIn ? in_tile(slot) : nullptr;
    const float* rows = L::kS ? s_rows(slot) : nullptr;

    // The SIMT part: expand, and the mask on the in tile. Thread: columns 8 chunk .. + 7 of
    // the block, tile rows tid / kChunks + 8 i.
    if (kExpand || (L::kIn && masked)) {
      constexpr int kRowStep = kThreads / kChunks;       // 8
      constexpr int kRowsPerThread = kTileT / kRowStep;  // 8
      constexpr int kGroup = 4;                          // rows whose sums are in registers
      const int chunk = tid % kChunks;
      const std::int64_t j = j0 + chunk * 8;
#pragma unroll 1
      for (int grp = 0; grp < kRowsPerThread / kGroup; ++grp) {
        float acc[kGroup][8];
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[k][i] = 0.0f;
        }
        if constexpr (kExpand) {  // sum_r s[t, r] W(j + i, r), r in order as the SIMT pass
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            const float4 lo4 = *reinterpret_cast<const float4*>(factor + r * kCols + chunk * 8);
            const float4 hi4 = *reinterpret_cast<const float4*>(factor + r * kCols + chunk * 8 + 4);
            const float w[8] = {lo4.x, lo4.y, lo4.z, lo4.w, hi4.x, hi4.y, hi4.z, hi4.w};
#pragma unroll
            for (int k = 0; k < kGroup; ++k) {
              const float s = rows[(tid / kChunks + (grp * kGroup + k) * kRowStep) * kR + r];
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[k][i] += s * w[i];
            }
          }
        }
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          const int row = tid / kChunks + (grp * kGroup + k) * kRowStep;
          const std::int64_t t = t0 + row;
          if (t >= t_end || j >= p.width) continue;
          const RowMask m = row_mask(p.drop, t, p.width);
          float keep[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) keep[i] = dropout_factor(p.drop, m, j + i);
          if constexpr (kExpand) {
            HalfVec<8> v = *reinterpret_cast<const HalfVec<8>*>(
                tiles::mn_at<kCols>(out_tile(slot), row, chunk * 8));
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              v.v[i] = __float2half_rn(__half2float(v.v[i]) + p.scale * keep[i] * acc[k][i]);
            }
            *reinterpret_cast<HalfVec<8>*>(p.out + t * p.width + j) = v;
          }
          if constexpr (L::kIn) {
            if (masked) {
              auto* x = reinterpret_cast<HalfVec<8>*>(tiles::mn_at<kCols>(in, row, chunk * 8));
              HalfVec<8> v = *x;
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                if (keep[i] == 0.0f) v.v[i] = __float2half_rn(0.0f);
              }
              *x = v;
            }
          }
        }
      }
      if (L::kIn && masked) __syncthreads();  // the masked tile, before the mmas read it
    }

    if constexpr (kShrink) {  // this warp's 16 tokens over the block's 128 columns
      float acc_s[1][kNR][4];
      tiles::zero_warp_tile(acc_s);
#pragma unroll
      for (int ks = 0; ks < kCols / 16; ++ks) {
        std::uint32_t a[4];
        tiles::ldmatrix_x4(
            a, tiles::mn_at<kCols>(in, warp * 16 + lane % 16, ks * 16 + (lane / 16) * 8));
#pragma unroll
        for (int nf = 0; nf < kNR; ++nf) {
          const uint4 f = frags[(ks * kNR + nf) * 32 + lane];
          tiles::mma_16816(acc_s[0][nf], a, f.x, f.y);
          tiles::mma_16816(acc_s[0][nf], a, f.z, f.w);
        }
      }
      float* part = p.shrink_part + static_cast<std::int64_t>(blockIdx.x) * p.tokens * p.rank;
      tiles::store_warp_tile(acc_s, t0 + warp * 16, 0, lane,
                             [&](std::int64_t t, std::int64_t r, float v0, float v1) {
                               if (t >= t_end) return;
                               if (r < p.rank) {
                                 part[t * p.rank + r] = v0 * w_inv[r] * drop_scale;
                               }
                               if (r + 1 < p.rank) {
                                 part[t * p.rank + r + 1] = v1 * w_inv[r + 1] * drop_scale;
                               }
                             });
    }

    if constexpr (kOuter) {  // the block's 128 columns over this warp's 16 tokens
      // B fragments of s: k = token (rows 2c, 2c + 1, 2c + 8, 2c + 9 of the warp's 16), n = r.
      std::uint32_t hi[kNR][2], lo[kNR][2];
      const int k0 = warp * 16 + 2 * c4;
#pragma unroll
      for (int nf = 0; nf < kNR; ++nf) {
        const int r = nf * 8 + g;
        const float sc = s_scale[r];
        split_pair(rows[k0 * kR + r] * sc, rows[(k0 + 1) * kR + r] * sc, hi[nf][0], lo[nf][0]);
        split_pair(rows[(k0 + 8) * kR + r] * sc, rows[(k0 + 9) * kR + r] * sc, hi[nf][1],
                   lo[nf][1]);
      }
      // A = the tile transposed: matrices (j 0-7, t lo), (j 8-15, t lo), (j 0-7, t hi),
      // (j 8-15, t hi), each read from 8 token rows.
      const int mat = lane / 8;
      const int k = warp * 16 + (mat / 2) * 8 + lane % 8;
#pragma unroll
      for (int mt = 0; mt < kCols / 16; ++mt) {
        std::uint32_t a[4];
        tiles::ldmatrix_x4_trans(a, tiles::mn_at<kCols>(in, k, mt * 16 + (mat % 2) * 8));
#pragma unroll
        for (int nf = 0; nf < kNR; ++nf) {
          tiles::mma_16816(acc_g[mt][nf], a, hi[nf][0], hi[nf][1]);
          tiles::mma_16816(acc_g[mt][nf], a, lo[nf][0], lo[nf][1]);
        }
      }
    }
  };

  tiles::pipelined_k_loop<L::kStages>(tile_count, load_stage, compute, prepare);

  if constexpr (kOuter) {  // add the warps' G in order; one partial per token block
    __syncthreads();       // every warp is done with the stages the sums reuse
    float* sums = reinterpret_cast<float*>(smem);  // [kWarps][kCols][kR]
    tiles::store_warp_tile(acc_g, 0, 0, lane,
                           [&](std::int64_t col, std::int64_t r, float v0, float v1) {
                             float* at = sums + (warp * kCols + col) * kR + r;
                             at[0] = v0;
                             at[1] = v1;
                           });
    __syncthreads();
    const std::int64_t j = j0 + tid;
    if (j < p.width) {
      float* dst = p.outer_part + (static_cast<std::int64_t>(blockIdx.y) * p.width + j) * p.rank;
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (r >= p.rank) break;
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += sums[(w * kCols + tid) * kR + r];
        dst[r] = total * s_inv[r] * drop_scale;
      }
    }
  }
}

// ---- kernel launchers ----

template <int kR, bool kShrink, bool kOuter, bool kExpand>
void launch_kind(const PassArgs& args, const PassGrid& grid, cudaStream_t stream) {
  using L = Layout<kR, kShrink, kOuter, kExpand>;
  const auto kernel = lora_mma_kernel<kR, kShrink, kOuter, kExpand>;
  opt_in_shared_memory(reinterpret_cast<const void*>(kernel), L::kBytes);
  launch_chained(
      kernel,
      dim3(static_cast<unsigned>(grid.col_blocks), static_cast<unsigned>(grid.token_blocks)),
      dim3(kThreads), L::kBytes, stream, args);
}

template <int kR>
void launch_rank(const PassArgs& args, const PassGrid& grid, bool shrink, bool outer, bool expand,
                 cudaStream_t stream) {
  if (shrink && !expand) {
    return outer ? launch_kind<kR, true, true, false>(args, grid, stream)
                 : launch_kind<kR, true, false, false>(args, grid, stream);
  }
  QG_CHECK(!shrink && (outer || expand), "LoRA tensor-core pass: shrink ", shrink, ", outer ",
           outer, ", expand ", expand, " is not a pass");
  if (outer && expand) return launch_kind<kR, false, true, true>(args, grid, stream);
  if (outer) return launch_kind<kR, false, true, false>(args, grid, stream);
  launch_kind<kR, false, false, true>(args, grid, stream);
}

}  // namespace

PassGrid mma_pass_grid(std::int64_t tokens, std::int64_t width) {
  PassGrid grid;
  grid.col_blocks = (width + kCols - 1) / kCols;
  grid.parts_per_col_block = 1;
  const std::int64_t tile_count = std::max<std::int64_t>(1, (tokens + kTileT - 1) / kTileT);
  const std::int64_t wanted = mma_token_blocks_bound(tokens, width);
  const std::int64_t tiles_per_block = (tile_count + wanted - 1) / wanted;
  grid.tokens_per_block = tiles_per_block * kTileT;
  grid.token_blocks =
      std::max<std::int64_t>(1, (tokens + grid.tokens_per_block - 1) / grid.tokens_per_block);
  return grid;
}

std::int64_t mma_token_blocks_bound(std::int64_t tokens, std::int64_t width) {
  const std::int64_t tile_count = std::max<std::int64_t>(1, (tokens + kTileT - 1) / kTileT);
  const std::int64_t col_blocks = (width + kCols - 1) / kCols;
  return std::min(tile_count, std::max<std::int64_t>(1, kTargetBlocks / col_blocks));
}

void launch_mma_pass(const PassArgs& args, const PassGrid& grid, bool shrink, bool outer,
                     bool expand, cudaStream_t stream) {
  QG_CHECK(args.rank >= 1 && args.rank <= kMmaMaxRank, "LoRA tensor-core pass: rank ", args.rank,
           " outside [1, ", kMmaMaxRank, "]");
  QG_CHECK(args.tokens_per_block == grid.tokens_per_block && args.tokens_per_block % kTileT == 0,
           "LoRA tensor-core pass: tokens per block ", args.tokens_per_block, " is not the grid's");
  if (args.rank <= 8) return launch_rank<8>(args, grid, shrink, outer, expand, stream);
  launch_rank<16>(args, grid, shrink, outer, expand, stream);
}

}  // namespace qg::cuda::lora_pass
