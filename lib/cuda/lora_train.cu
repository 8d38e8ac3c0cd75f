// LoRA of a training step (include/qinggeng/cuda/lora_train.h): memory-bound passes over the
// activations with fp32 accumulation and the fp32 factors read in place. Every pass over a
// [tokens, width] fp16 matrix is one kernel that streams it once: lora_pass_kernel here (SIMT),
// or with LoraTrainKernels::TensorCores lora_mma_kernel (lora_train_mma.cu). Either does any of
//
//   shrink  s[t, r] = sum_j in~[t, j] W(j, r)         u = x~ A^T  (forward),  v = dy B
//   outer   G[j, r] = sum_t in~[t, j] s[t, r]         dB = dy^T u,            dA = v^T x~
//   expand  out[t, j] += scale drop'(sum_r s[t, r] W(j, r))   y += scale u B^T,  dx += ...
//
// where in~ is the input after dropout (x~ = dropout(x); dy has none) and W(j, r) is the
// factor seen from column j: A[r, j] on the `in` side, B[j, r] on the `out` side. So
//
//   forward   pass(x: shrink -> u partials), sum(u), pass(y: expand with u)
//   backward  pass(dy: shrink -> v partials, outer -> dB partials), sum(v), sum(dB),
//             pass(x and dx: outer -> dA partials, expand into dx), sum(dA)
//
// Each thread owns kCols = 32 / kR consecutive columns (4 at rank <= 8: one 8-byte access a
// token; one column from rank 17 on) and keeps their factor values (and, for outer, their
// [kCols, kR] sums) in registers: at most 128 registers up to rank 16 (launch bounds: four
// blocks an SM), more and two to three blocks an SM at higher ranks; a block of 128 threads
// covers 128 kCols columns and a range of tokens, kSub tokens in flight (their rows' dropout
// seeds are loaded with their data). A shrink is reduced within the warp and written as one
// partial per (column block, warp), with no block barrier; outer and expand read the finished
// s from shared memory, where the block stages it once per 64 tokens (two barriers). Sums over
// tokens (outer) are written as one partial per token block. Partials are added in a fixed
// order by sum_parts_kernel, so results are deterministic; the grid shape depends on the sizes
// only (not on the GPU), so every GPU adds the same partials in the same order.
//
// The dropout mask is reference_backward.h's dropout_keep: element (t, j) of x is kept iff
// (counter_bits32(splitmix64(seed), t * in + j) >> 8) / 2^24 >= p (qinggeng/counter_hash.h,
// the same code on both sides), i.e. iff the 24 hash bits are >= ceil(p * 2^24), an integer
// compare that draws the CPU's mask bit for bit. Each row's key is made once. Packed examples
// (row_seed / row_position) use each row's own seed and row-in-example index.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "cuda/lora_train_pass.cuh"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

using lora_pass::Dropout;
using lora_pass::dropout_factor;
using lora_pass::PassArgs;
using lora_pass::PassGrid;
using lora_pass::row_mask;
using lora_pass::RowMask;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSumLanes = 8;   // lanes of sum_parts_kernel per output
constexpr int kSumUnroll = 4;  // partials each of those lanes loads at once

/// Columns a thread owns at rounded rank kR (see the file comment).
constexpr int columns_per_thread(int kR) { return kR >= 32 ? 1 : 32 / kR; }
constexpr int kTokenGroup = 8;  // tokens per block are a multiple of this (and of kSub)
constexpr int kStage = 64;      // tokens whose s a block stages in shared memory at a time
// Blocks a pass aims for (four per SM of an H100 at rank <= 8): every token block loads its
// columns' factor values and (outer) writes a partial of the factor gradient, so more blocks
// cost more.
constexpr int kTargetBlocks = 528;
constexpr int kSumThreads = 256;

// ---- device helpers ----

/// Sums each of v[0, kN) over the warp, spreading the totals over the lanes (a transposing
/// reduction: kN - 1 + log2 shuffles instead of 5 kN). On return v[0, max(1, kN / 32)) holds
/// the totals of values first, first + 1, ...; `first` starts at 0. Lanes that differ only
/// in their low 5 - log2(min(kN, 32)) bits hold the same totals.
template <int kN, int kOffset = 16>
__device__ __forceinline__ void warp_sum_scatter(float* v, int lane, int& first) {
  if constexpr (kN > 1) {
    constexpr int kHalf = kN / 2;
    const bool upper = (lane & kOffset) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float keep = upper ? v[i + kHalf] : v[i];
      const float send = upper ? v[i] : v[i + kHalf];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
    }
    if (upper) first += kHalf;
    if constexpr (kOffset > 1) warp_sum_scatter<kHalf, kOffset / 2>(v, lane, first);
  } else {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOffset);
    if constexpr (kOffset > 1) warp_sum_scatter<1, kOffset / 2>(v, lane, first);
  }
}

/// w[k][r] = W(j0 + k, r) for r < rank, else 0 (all 0 for an inactive thread), with 16-byte
/// loads where the factor's layout allows them (p.w_vec4).
template <int kCols, int kR>
__device__ __forceinline__ void load_factor(const PassArgs& p, std::int64_t j0, bool active,
                                            float (&w)[kCols][kR]) {
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
#pragma unroll
    for (int r = 0; r < kR; ++r) w[k][r] = 0.0f;
  }
  if (!active) return;
  if constexpr (kCols % 4 == 0) {
    if (p.w_vec4 && p.w_j == 1) {  // A [rank, in]: columns j0.. of row r are contiguous
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (r >= p.rank) break;
#pragma unroll
        for (int k = 0; k < kCols; k += 4) {
          const float4 v = *reinterpret_cast<const float4*>(p.w + r * p.w_r + j0 + k);
          w[k][r] = v.x, w[k + 1][r] = v.y, w[k + 2][r] = v.z, w[k + 3][r] = v.w;
        }
      }
      return;
    }
  }
  if constexpr (kR % 4 == 0) {
    if (p.w_vec4 && p.w_r == 1) {  // B [out, rank]: row j0 + k is contiguous
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
#pragma unroll
        for (int r = 0; r < kR; r += 4) {
          if (r >= p.rank) break;
          const float4 v = *reinterpret_cast<const float4*>(p.w + (j0 + k) * p.w_j + r);
          w[k][r] = v.x, w[k][r + 1] = v.y, w[k][r + 2] = v.z, w[k][r + 3] = v.w;
        }
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r < p.rank) w[k][r] = p.w[r * p.w_r + (j0 + k) * p.w_j];
    }
  }
}

// ---- CUDA kernels ----

/// One pass (see the file comment); kR is the rank rounded up to 8, 16, 32 or 64.
/// Grid: (column blocks, token blocks).
template <int kR, bool kShrink, bool kOuter, bool kExpand>
__global__ void __launch_bounds__(kThreads, kR <= 16 ? 4 : 1) lora_pass_kernel(const PassArgs p) {
  chain_release();
  chain_wait();
  constexpr int kCols = columns_per_thread(kR);
  constexpr int kSub = kOuter && kExpand ? 4 : 8;  // tokens in flight (registers)
  constexpr int kSpread = kR > 32 ? kR / 32 : 1;   // shrink totals per lane
  constexpr int kDuplicates = kR >= 32 ? 1 : 32 / kR;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t j0 = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kCols;
  const bool active = j0 < p.width;

  float w[kCols][kR];
  load_factor<kCols, kR>(p, j0, active, w);
  float g[kOuter ? kCols : 1][kR];
#pragma unroll
  for (int k = 0; k < (kOuter ? kCols : 1); ++k) {
#pragma unroll
    for (int r = 0; r < kR; ++r) g[k][r] = 0.0f;
  }
  float* shrink_out =
      kShrink ? p.shrink_part + (blockIdx.x * kWarps + warp) * p.tokens * p.rank : nullptr;

  // s of the next kStage tokens, staged once per chunk (outer, expand).
  __shared__ float s_stage[kOuter || kExpand ? kStage : 1][kR];
  const std::int64_t t_begin = static_cast<std::int64_t>(blockIdx.y) * p.tokens_per_block;
  const std::int64_t t_end = std::min(p.tokens, t_begin + p.tokens_per_block);
  for (std::int64_t chunk = t_begin; chunk < t_end; chunk += kStage) {
    const std::int64_t chunk_end = std::min(t_end, chunk + kStage);
    if constexpr (kOuter || kExpand) {
      __syncthreads();  // the previous chunk's s is no longer read
      for (int e = threadIdx.x; e < kStage * kR; e += kThreads) {
        const int tt = e / kR, r = e % kR;
        s_stage[tt][r] =
            chunk + tt < chunk_end && r < p.rank ? p.s[(chunk + tt) * p.rank + r] : 0.0f;
      }
      __syncthreads();
    }
    for (std::int64_t t0 = chunk; t0 < chunk_end; t0 += kSub) {
      // The same for the whole block, so the shuffles below stay warp-uniform.
      const int count = static_cast<int>(std::min<std::int64_t>(kSub, chunk_end - t0));
      HalfVec<kCols> in_v[kSub], out_v[kSub];
      RowMask masks[kSub];  // loaded with the data, before this group's stores
#pragma unroll
      for (int tt = 0; tt < kSub; ++tt) {
        const bool live = active && tt < count;
        const std::int64_t at = (t0 + tt) * p.width + j0;
        if (tt < count) masks[tt] = row_mask(p.drop, t0 + tt, p.width);
        if constexpr (kShrink || kOuter) {
          in_v[tt] = live ? *reinterpret_cast<const HalfVec<kCols>*>(p.in + at) : HalfVec<kCols>{};
        }
        if constexpr (kExpand) {
          if (live) out_v[tt] = *reinterpret_cast<const HalfVec<kCols>*>(p.out + at);
        }
      }
#pragma unroll
      for (int tt = 0; tt < kSub; ++tt) {
        if (tt >= count) break;
        const std::int64_t t = t0 + tt;
        float keep[kCols], x[kCols];
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          keep[k] = dropout_factor(p.drop, masks[tt], j0 + k);
          // A dropped element is 0 even when it is not finite, as on the CPU.
          if constexpr (kShrink || kOuter) {
            x[k] = keep[k] != 0.0f ? __half2float(in_v[tt].v[k]) * keep[k] : 0.0f;
          }
        }
        if constexpr (kShrink) {
          float part[kR];
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            part[r] = 0.0f;
#pragma unroll
            for (int k = 0; k < kCols; ++k) part[r] += x[k] * w[k][r];
          }
          int first = 0;
          warp_sum_scatter<kR>(part, lane, first);
          if (lane % kDuplicates == 0) {
#pragma unroll
            for (int i = 0; i < kSpread; ++i) {
              if (first + i < p.rank) shrink_out[t * p.rank + first + i] = part[i];
            }
          }
        }
        if constexpr (kOuter || kExpand) {
          float s[kR];
#pragma unroll
          for (int r = 0; r < kR; ++r) s[r] = s_stage[t - chunk][r];
          if constexpr (kOuter) {
#pragma unroll
            for (int k = 0; k < kCols; ++k) {
#pragma unroll
              for (int r = 0; r < kR; ++r) g[k][r] += x[k] * s[r];
            }
          }
          if constexpr (kExpand) {
            if (active) {
#pragma unroll
              for (int k = 0; k < kCols; ++k) {
                float acc = 0.0f;
#pragma unroll
                for (int r = 0; r < kR; ++r) acc += s[r] * w[k][r];
                out_v[tt].v[k] =
                    __float2half_rn(__half2float(out_v[tt].v[k]) + p.scale * keep[k] * acc);
              }
              *reinterpret_cast<HalfVec<kCols>*>(p.out + t * p.width + j0) = out_v[tt];
            }
          }
        }
      }
    }
  }
  if constexpr (kOuter) {
    if (active) {
      float* dst = p.outer_part + (blockIdx.y * p.width + j0) * p.rank;
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          if (r < p.rank) dst[k * p.rank + r] = g[k][r];
        }
      }
    }
  }
}

/// For e < n: total = the sum over i < parts of part[i * n + e]; then
/// out[(e / rank) * o_j + (e % rank) * o_r] = scale * total, or += with `accumulate`. kSumLanes
/// lanes share an output: lane l adds parts l, l + kSumLanes, ... in order, then the lanes
/// combine in a fixed tree, so the result is the same on every run.
__global__ void sum_parts_kernel(const float* part, int parts, std::int64_t n, int rank,
                                 float scale, bool accumulate, float* out, std::int64_t o_j,
                                 std::int64_t o_r) {
  chain_release();
  chain_wait();
  const std::int64_t id = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t e = id / kSumLanes;
  const int lane = static_cast<int>(id % kSumLanes);
  float total = 0.0f;
  if (e < n) {
    // kSumUnroll loads in flight, added in the same order as one at a time.
    for (int i = lane; i < parts; i += kSumLanes * kSumUnroll) {
      float v[kSumUnroll];
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
        const int at = i + u * kSumLanes;
        v[u] = at < parts ? part[static_cast<std::int64_t>(at) * n + e] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) total += v[u];
    }
  }
#pragma unroll
  for (int offset = kSumLanes / 2; offset > 0; offset /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  }
  if (e >= n || lane != 0) return;
  float& dst = out[(e / rank) * o_j + (e % rank) * o_r];
  dst = accumulate ? dst + scale * total : scale * total;
}

/// u16 [tokens, width] = fp16(u), v16 [out, width] = fp16(scale * B), zero past `rank`.
__global__ void pack_low_rank_kernel(const float* u, const float* b, std::int64_t tokens,
                                     std::int64_t out, int rank, int width, float scale,
                                     __half* u16, __half* v16) {
  chain_release();
  chain_wait();
  const std::int64_t total = (tokens + out) * width;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / width;
    const int c = static_cast<int>(i % width);
    if (row < tokens) {
      u16[i] = __float2half_rn(c < rank ? u[row * rank + c] : 0.0f);
    } else {
      const std::int64_t j = row - tokens;
      v16[j * width + c] = __float2half_rn(c < rank ? scale * b[j * rank + c] : 0.0f);
    }
  }
}

// ---- kernel launchers ----

int rounded_rank(std::int64_t rank) {
  return rank <= 8 ? 8 : rank <= 16 ? 16 : rank <= 32 ? 32 : 64;
}

PassGrid pass_grid(std::int64_t tokens, std::int64_t width, std::int64_t rank) {
  PassGrid grid;
  const std::int64_t cols_per_block = kThreads * columns_per_thread(rounded_rank(rank));
  grid.col_blocks = (width + cols_per_block - 1) / cols_per_block;
  const std::int64_t groups = std::max<std::int64_t>(1, (tokens + kTokenGroup - 1) / kTokenGroup);
  const std::int64_t wanted = std::max<std::int64_t>(1, kTargetBlocks / grid.col_blocks);
  const std::int64_t groups_per_block =
      (groups + std::min(groups, wanted) - 1) / std::min(groups, wanted);
  grid.tokens_per_block = groups_per_block * kTokenGroup;
  grid.token_blocks =
      std::max<std::int64_t>(1, (tokens + grid.tokens_per_block - 1) / grid.tokens_per_block);
  grid.parts_per_col_block = kWarps;
  return grid;
}

template <int kR, bool kShrink, bool kOuter, bool kExpand>
void launch_pass_r(const PassArgs& args, const PassGrid& grid, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(grid.col_blocks),
                    static_cast<unsigned>(grid.token_blocks));
  launch_chained(lora_pass_kernel<kR, kShrink, kOuter, kExpand>, dim3(blocks), dim3(kThreads), 0,
                 stream, args);
}

template <bool kShrink, bool kOuter, bool kExpand>
void launch_pass(PassArgs args, const PassGrid& grid, cudaStream_t stream) {
  args.tokens_per_block = grid.tokens_per_block;
  switch (rounded_rank(args.rank)) {
    case 8:
      return launch_pass_r<8, kShrink, kOuter, kExpand>(args, grid, stream);
    case 16:
      return launch_pass_r<16, kShrink, kOuter, kExpand>(args, grid, stream);
    case 32:
      return launch_pass_r<32, kShrink, kOuter, kExpand>(args, grid, stream);
    default:
      return launch_pass_r<64, kShrink, kOuter, kExpand>(args, grid, stream);
  }
}

/// Sums `parts` partials of n = rows * rank floats into out (see sum_parts_kernel).
void launch_sum(const float* part, std::int64_t parts, std::int64_t rows, int rank, float scale,
                bool accumulate, float* out, std::int64_t o_j, std::int64_t o_r,
                cudaStream_t stream) {
  const std::int64_t n = rows * rank;
  const std::int64_t threads = n * kSumLanes;
  launch_chained(sum_parts_kernel,
                 dim3(static_cast<unsigned>((threads + kSumThreads - 1) / kSumThreads)),
                 dim3(kSumThreads), 0, stream, part, static_cast<int>(parts), n, rank, scale,
                 accumulate, out, o_j, o_r);
}

/// s [tokens][rank] = the sum of a shrink's partials.
void sum_shrink(const float* part, const PassGrid& grid, std::int64_t tokens, int rank, float* s,
                cudaStream_t stream) {
  launch_sum(part, grid.shrink_parts(), tokens, rank, 1.0f, false, s, rank, 1, stream);
}

/// Whether `shape` runs the tensor-core passes (LoraTrainKernels; Auto is Simt for now).
bool tensor_cores(const LoraTrainShape& s) {
  return s.kernels == LoraTrainKernels::TensorCores && s.rank <= lora_pass::kMmaMaxRank;
}

/// The launch shape of `shape`'s passes over `width` columns.
PassGrid grid_of(const LoraTrainShape& s, std::int64_t width) {
  return tensor_cores(s) ? lora_pass::mma_pass_grid(s.tokens, width)
                         : pass_grid(s.tokens, width, s.rank);
}

/// One pass of `shape` on the kernels it asks for.
template <bool kShrink, bool kOuter, bool kExpand>
void run_pass(const LoraTrainShape& s, PassArgs args, const PassGrid& grid, cudaStream_t stream) {
  if (tensor_cores(s)) {
    args.tokens_per_block = grid.tokens_per_block;
    lora_pass::launch_mma_pass(args, grid, kShrink, kOuter, kExpand, stream);
  } else {
    launch_pass<kShrink, kOuter, kExpand>(args, grid, stream);
  }
}

Dropout dropout_of(const LoraTrainShape& shape) {
  Dropout d;
  if (shape.dropout > 0.0f) {
    d.seed = shape.seed;
    // uniform = bits / 2^24 >= p  <=>  bits >= ceil(p * 2^24) (both sides exact in double).
    d.threshold =
        static_cast<std::uint32_t>(std::ceil(static_cast<double>(shape.dropout) * 16777216.0));
    d.keep_scale = 1.0f / (1.0f - shape.dropout);
    d.row_seed = shape.row_seed;
    d.row_position = shape.row_position;
  }
  return d;
}

/// A pass over `width` columns against the factor W(j, r) = w[r * w_r + j * w_j]; w_vec4
/// when its contiguous runs (of length w_r == 1 ? rank : width) hold whole aligned float4s.
PassArgs pass_over(const LoraTrainShape& shape, std::int64_t width, const float* w,
                   std::int64_t w_r, std::int64_t w_j) {
  PassArgs p;
  p.tokens = shape.tokens;
  p.width = width;
  p.w = w;
  p.w_r = w_r;
  p.w_j = w_j;
  const std::int64_t run = w_r == 1 ? shape.rank : width;  // width % 8 == 0 (check_shape)
  p.w_vec4 = reinterpret_cast<std::uintptr_t>(w) % 16 == 0 && run % 4 == 0;
  p.rank = static_cast<int>(shape.rank);
  return p;
}

/// A pass over the adapted linear's input side: x (or dx) [tokens, in] against A [rank, in],
/// under the dropout mask.
PassArgs input_side(const LoraTrainShape& shape, const float* a) {
  PassArgs p = pass_over(shape, shape.in, a, shape.in, 1);
  p.drop = dropout_of(shape);
  return p;
}

/// A pass over the output side: y (or dy) [tokens, out] against B [out, rank], no dropout.
PassArgs output_side(const LoraTrainShape& shape, const float* b) {
  return pass_over(shape, shape.out, b, 1, shape.rank);
}

void check_shape(const LoraTrainShape& s, const char* op) {
  QG_CHECK(s.tokens >= 0 && s.tokens <= 0x7fffffff, op, ": ", s.tokens, " tokens");
  QG_CHECK(s.in > 0 && s.out > 0 && s.in % 8 == 0 && s.out % 8 == 0, op, ": in ", s.in, " and out ",
           s.out, " must be positive multiples of 8");
  QG_CHECK(s.rank >= 1 && s.rank <= 64, op, ": rank ", s.rank, " outside [1, 64]");
  QG_CHECK(s.dropout >= 0.0f && s.dropout < 1.0f, op, ": dropout ", s.dropout, " outside [0, 1)");
  QG_CHECK((s.row_seed == nullptr) == (s.row_position == nullptr), op,
           ": row_seed and row_position are set together (packed examples) or not at all");
}

void check_workspace(const LoraTrainShape& s, const void* workspace, std::size_t bytes,
                     const char* op) {
  QG_CHECK(workspace != nullptr && bytes >= lora_train_workspace_bytes(s), op, ": workspace of ",
           bytes, " bytes, need ", lora_train_workspace_bytes(s));
}

std::size_t floats_bytes(std::int64_t count) {
  return (static_cast<std::size_t>(count) * sizeof(float) + 255) / 256 * 256;
}

/// An upper bound of pass_grid(...).token_blocks that never decreases with tokens (the
/// actual count can: one group more than kTargetBlocks allows halves it), so workspace bytes
/// sized for the largest call serve every smaller one.
std::int64_t token_blocks_bound(std::int64_t tokens, std::int64_t width, std::int64_t rank) {
  const std::int64_t groups = std::max<std::int64_t>(1, (tokens + kTokenGroup - 1) / kTokenGroup);
  const std::int64_t simt = std::min(
      groups, std::max<std::int64_t>(1, kTargetBlocks / pass_grid(tokens, width, rank).col_blocks));
  return std::max(simt, lora_pass::mma_token_blocks_bound(tokens, width));
}

/// Byte offsets of the workspace's parts: shrink partials, then v (backward), then outer
/// partials.
struct WorkspaceLayout {
  std::size_t shrink_part = 0, v = 0, outer_part = 0, bytes = 0;

  explicit WorkspaceLayout(const LoraTrainShape& s) {
    // Room for either kind of pass (LoraTrainKernels).
    const std::int64_t parts = std::max({pass_grid(s.tokens, s.in, s.rank).shrink_parts(),
                                         pass_grid(s.tokens, s.out, s.rank).shrink_parts(),
                                         lora_pass::mma_pass_grid(s.tokens, s.in).shrink_parts(),
                                         lora_pass::mma_pass_grid(s.tokens, s.out).shrink_parts()});
    v = shrink_part + floats_bytes(parts * s.tokens * s.rank);
    outer_part = v + floats_bytes(s.tokens * s.rank);
    bytes = outer_part +
            std::max(floats_bytes(token_blocks_bound(s.tokens, s.out, s.rank) * s.out * s.rank),
                     floats_bytes(token_blocks_bound(s.tokens, s.in, s.rank) * s.in * s.rank));
  }
};

/// The workspace's parts at `base`.
struct Workspace {
  float *shrink_part, *v, *outer_part;

  Workspace(const LoraTrainShape& s, void* base) {
    const WorkspaceLayout layout(s);
    auto* at = static_cast<char*>(base);
    shrink_part = reinterpret_cast<float*>(at + layout.shrink_part);
    v = reinterpret_cast<float*>(at + layout.v);
    outer_part = reinterpret_cast<float*>(at + layout.outer_part);
  }
};

/// u [tokens, rank] = dropout(x) A^T (tokens > 0): the forward's shrink pass and its sum.
void shrink_to_u(const __half* x, const float* a, const LoraTrainShape& shape, float* u,
                 void* workspace, cudaStream_t stream) {
  const PassGrid in_side = grid_of(shape, shape.in);
  const Workspace ws(shape, workspace);
  PassArgs shrink = input_side(shape, a);
  shrink.in = x;
  shrink.shrink_part = ws.shrink_part;
  run_pass<true, false, false>(shape, shrink, in_side, stream);
  sum_shrink(ws.shrink_part, in_side, shape.tokens, shrink.rank, u, stream);
}

}  // namespace

std::size_t lora_train_workspace_bytes(const LoraTrainShape& s) {
  return WorkspaceLayout(s).bytes;
}

void lora_train_forward(const __half* x, const float* a, const float* b,
                        const LoraTrainShape& shape, __half* y, float* u, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream) {
  check_shape(shape, "lora_train_forward");
  QG_CHECK(x && a && b && y && u, "lora_train_forward: null pointer");
  QG_CHECK(aligned16(x) && aligned16(y), "lora_train_forward: x and y must be 16-byte aligned");
  check_workspace(shape, workspace, workspace_bytes, "lora_train_forward");
  if (shape.tokens == 0) return;
  shrink_to_u(x, a, shape, u, workspace, stream);
  const PassGrid out_side = grid_of(shape, shape.out);
  PassArgs expand = output_side(shape, b);  // y += scale u B^T
  expand.out = y;
  expand.s = u;
  expand.scale = shape.scale;
  run_pass<false, false, true>(shape, expand, out_side, stream);
}

std::int64_t lora_train_low_rank_width(std::int64_t rank) { return (rank + 7) / 8 * 8; }

void lora_train_shrink(const __half* x, const float* a, const float* b, const LoraTrainShape& shape,
                       float* u, __half* u16, __half* v16, void* workspace,
                       std::size_t workspace_bytes, cudaStream_t stream) {
  check_shape(shape, "lora_train_shrink");
  QG_CHECK(x && a && b && u && u16 && v16, "lora_train_shrink: null pointer");
  QG_CHECK(aligned16(x) && aligned16(u16) && aligned16(v16),
           "lora_train_shrink: x, u16 and v16 must be 16-byte aligned");
  check_workspace(shape, workspace, workspace_bytes, "lora_train_shrink");
  if (shape.tokens > 0) shrink_to_u(x, a, shape, u, workspace, stream);
  const auto width = static_cast<int>(lora_train_low_rank_width(shape.rank));
  const std::int64_t total = (shape.tokens + shape.out) * width;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 4096));
  launch_chained(pack_low_rank_kernel, dim3(blocks), dim3(256), 0, stream, u, b, shape.tokens,
                 shape.out, static_cast<int>(shape.rank), width, shape.scale, u16, v16);
}

void lora_train_backward(const __half* x, const float* a, const float* b, const float* u,
                         const __half* dy, const LoraTrainShape& shape, __half* dx, float* da,
                         float* db, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  check_shape(shape, "lora_train_backward");
  QG_CHECK(x && a && b && u && dy, "lora_train_backward: null pointer");
  QG_CHECK(aligned16(x) && aligned16(dy) && (dx == nullptr || aligned16(dx)),
           "lora_train_backward: x, dy and dx must be 16-byte aligned");
  check_workspace(shape, workspace, workspace_bytes, "lora_train_backward");
  if (shape.tokens == 0 || (dx == nullptr && da == nullptr && db == nullptr)) return;
  const PassGrid in_side = grid_of(shape, shape.in);
  const PassGrid out_side = grid_of(shape, shape.out);
  const int rank = static_cast<int>(shape.rank);
  const Workspace ws(shape, workspace);
  const bool need_v = dx != nullptr || da != nullptr;

  PassArgs over_dy = output_side(shape, b);  // v partials = dy B; dB partials = dy^T u
  over_dy.in = dy;
  over_dy.s = u;
  over_dy.shrink_part = ws.shrink_part;
  over_dy.outer_part = ws.outer_part;
  if (need_v && db != nullptr) {
    run_pass<true, true, false>(shape, over_dy, out_side, stream);
  } else if (need_v) {
    run_pass<true, false, false>(shape, over_dy, out_side, stream);
  } else {
    run_pass<false, true, false>(shape, over_dy, out_side, stream);
  }
  if (db != nullptr) {
    launch_sum(ws.outer_part, out_side.token_blocks, shape.out, rank, shape.scale, true, db,
               shape.rank, 1, stream);
  }
  if (!need_v) return;
  sum_shrink(ws.shrink_part, out_side, shape.tokens, rank, ws.v, stream);

  PassArgs over_x = input_side(shape, a);  // dA partials = v^T x~; dx += drop'(scale v A)
  over_x.in = x;
  over_x.out = dx;
  over_x.s = ws.v;
  over_x.outer_part = ws.outer_part;
  over_x.scale = shape.scale;
  if (da != nullptr && dx != nullptr) {
    run_pass<false, true, true>(shape, over_x, in_side, stream);
  } else if (da != nullptr) {
    run_pass<false, true, false>(shape, over_x, in_side, stream);
  } else {
    run_pass<false, false, true>(shape, over_x, in_side, stream);
  }
  if (da != nullptr) {
    launch_sum(ws.outer_part, in_side.token_blocks, shape.in, rank, shape.scale, true, da, 1,
               shape.in, stream);
  }
}

}  // namespace qg::cuda
