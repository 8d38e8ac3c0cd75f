// LoRA of a training step (include/qinggeng/cuda/lora_train.h): memory-bound passes over the
// activations with fp32 accumulation and the fp32 factors read in place. Every pass is one
// kernel, lora_pass_kernel, that streams a [tokens, width] fp16 matrix once and does any of
//
//   shrink  s[t, r] = sum_j in~[t, j] W(j, r)         u = x~ A^T  (forward),  v = dy B
//   outer   G[j, r] = sum_t in~[t, j] s[t, r]         dB = dy^T u,            dA = v^T x~
//   expand  out[t, j] += scale drop'(sum_r s[t, r] W(j, r))   y += scale u B^T,  dx += ...
//
// where in~ is the input after dropout (x~ = dropout(x); dy has none) and W(j, r) is the
// factor seen from column j: A[r, j] on the `in` side, B[j, r] on the `out` side. So
//
//   forward   pass(x: shrink -> u partials), pass(y: expand, summing u and saving it)
//   backward  pass(dy: shrink -> v partials, outer -> dB partials), reduce(dB),
//             pass(x and dx: outer -> dA partials, expand into dx), reduce(dA)
//
// Each thread owns kCols = 64 / kR consecutive columns (8 at rank <= 8: one 16-byte access a
// token) and keeps their factor values (and, for outer, their [kCols, kR] sums) in registers;
// a block of 128 threads covers 128 kCols columns and a range of tokens, loaded kSub at a time.
// Sums over columns (shrink) are reduced in the warp, then over the block's warps in shared
// memory, and written as one partial per column block; sums over tokens (outer) are written as
// one partial per token block. The partials are added in a fixed order by the next pass (u, v)
// or by reduce_parts_kernel (dA, dB), so results are deterministic. The grid shape depends on
// the sizes only (not on the GPU), so the same call gives the same bits on every GPU.
//
// The dropout mask is reference_backward.h's dropout_keep: element t * in + j of x is kept iff
// (splitmix64(seed ^ splitmix64(t * in + j)) >> 40) / 2^24 >= p, i.e. iff the 24 hash bits are
// >= ceil(p * 2^24), an integer compare that draws the CPU's mask bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTokenGroup = 8;       // tokens per block are a multiple of this (and of kSub)
constexpr int kTargetBlocks = 264;   // blocks a pass aims for (two per SM of an H100)

/// The dropout of one call (threshold 0: none).
struct Dropout {
  std::uint64_t seed = 0;
  std::uint32_t threshold = 0;  ///< keep iff the top 24 hash bits >= threshold
  float keep_scale = 1.0f;      ///< 1 / (1 - p), computed in float as the CPU does
};

/// Everything one lora_pass_kernel launch reads and writes (see the file comment).
struct PassArgs {
  const __half* in = nullptr;  ///< [tokens, width] (shrink, outer)
  __half* out = nullptr;       ///< [tokens, width] updated in place (expand)
  std::int64_t tokens = 0, width = 0;
  const float* w = nullptr;  ///< the factor: W(j, r) = w[r * w_r + j * w_j]
  std::int64_t w_r = 0, w_j = 0;
  int rank = 0;
  Dropout drop;                ///< applies to in and to expand's update (index t * width + j)
  const float* s = nullptr;    ///< [s_parts][tokens][rank] whose sum is s (outer, expand)
  int s_parts = 0;
  float* s_sum = nullptr;      ///< if set, blocks of column block 0 store the summed s here
  float* shrink_part = nullptr;  ///< [column blocks][tokens][rank] (shrink)
  float* outer_part = nullptr;   ///< [token blocks][width][rank] (outer)
  std::int64_t tokens_per_block = 0;  ///< a multiple of kTokenGroup
  float scale = 1.0f;                 ///< expand
};

/// The launch shape of a pass over `width` columns: fixed by the sizes alone.
struct PassGrid {
  std::int64_t col_blocks = 0, token_blocks = 0, tokens_per_block = 0;
};

// ---- device helpers ----

__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// What dropout multiplies element `index` by: 0 or keep_scale (1 without dropout).
__device__ __forceinline__ float dropout_factor(const Dropout& d, std::uint64_t index) {
  if (d.threshold == 0) return 1.0f;
  const auto bits = static_cast<std::uint32_t>(splitmix64(d.seed ^ splitmix64(index)) >> 40);
  return bits >= d.threshold ? d.keep_scale : 0.0f;
}

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

// ---- CUDA kernels ----

/// One pass (see the file comment); kR is the rank rounded up to 8, 16, 32 or 64.
/// Grid: (column blocks, token blocks).
template <int kR, bool kShrink, bool kOuter, bool kExpand>
__global__ void __launch_bounds__(kThreads) lora_pass_kernel(const PassArgs p) {
  constexpr int kCols = 64 / kR;
  constexpr int kSub = kOuter && kExpand ? 4 : 8;  // tokens in flight (registers)
  constexpr int kSpread = kR > 32 ? kR / 32 : 1;   // shrink totals per lane
  constexpr int kDuplicates = kR >= 32 ? 1 : 32 / kR;
  __shared__ float s_tile[kSub][kR];
  __shared__ float warp_part[kShrink ? kWarps : 1][kSub][kR];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t j0 = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kCols;
  const bool active = j0 < p.width;

  float w[kCols][kR];
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      w[k][r] = active && r < p.rank ? p.w[r * p.w_r + (j0 + k) * p.w_j] : 0.0f;
    }
  }
  float g[kOuter ? kCols : 1][kR];
#pragma unroll
  for (int k = 0; k < (kOuter ? kCols : 1); ++k) {
#pragma unroll
    for (int r = 0; r < kR; ++r) g[k][r] = 0.0f;
  }

  const std::int64_t t_begin = static_cast<std::int64_t>(blockIdx.y) * p.tokens_per_block;
  const std::int64_t t_end = std::min(p.tokens, t_begin + p.tokens_per_block);
  for (std::int64_t t0 = t_begin; t0 < t_end; t0 += kSub) {
    const int count = static_cast<int>(std::min<std::int64_t>(kSub, t_end - t0));
    if constexpr (kOuter || kExpand) {
      for (int e = threadIdx.x; e < kSub * kR; e += kThreads) {
        const int tt = e / kR, r = e % kR;
        float v = 0.0f;
        if (tt < count && r < p.rank) {
          const std::int64_t at = (t0 + tt) * p.rank + r;
          for (int part = 0; part < p.s_parts; ++part) v += p.s[part * p.tokens * p.rank + at];
          if (p.s_sum != nullptr && blockIdx.x == 0) p.s_sum[at] = v;
        }
        s_tile[tt][r] = v;
      }
      __syncthreads();
    }
    HalfVec<kCols> in_v[kSub], out_v[kSub];
#pragma unroll
    for (int tt = 0; tt < kSub; ++tt) {
      const bool live = active && tt < count;
      const std::int64_t at = (t0 + tt) * p.width + j0;
      if constexpr (kShrink || kOuter) {
        in_v[tt] = live ? *reinterpret_cast<const HalfVec<kCols>*>(p.in + at) : HalfVec<kCols>{};
      }
      if constexpr (kExpand) {
        if (live) out_v[tt] = *reinterpret_cast<const HalfVec<kCols>*>(p.out + at);
      }
    }
#pragma unroll
    for (int tt = 0; tt < kSub; ++tt) {
      const std::int64_t at = (t0 + tt) * p.width + j0;
      float keep[kCols], x[kCols];
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        keep[k] = tt < count ? dropout_factor(p.drop, static_cast<std::uint64_t>(at + k)) : 0.0f;
        if constexpr (kShrink || kOuter) x[k] = __half2float(in_v[tt].v[k]) * keep[k];
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
          for (int i = 0; i < kSpread; ++i) warp_part[warp][tt][first + i] = part[i];
        }
      }
      if constexpr (kOuter) {
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
#pragma unroll
          for (int r = 0; r < kR; ++r) g[k][r] += x[k] * s_tile[tt][r];
        }
      }
      if constexpr (kExpand) {
        if (active && tt < count) {
#pragma unroll
          for (int k = 0; k < kCols; ++k) {
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < kR; ++r) acc += s_tile[tt][r] * w[k][r];
            out_v[tt].v[k] =
                __float2half_rn(__half2float(out_v[tt].v[k]) + p.scale * keep[k] * acc);
          }
          *reinterpret_cast<HalfVec<kCols>*>(p.out + at) = out_v[tt];
        }
      }
    }
    if constexpr (kShrink) {
      __syncthreads();
      for (int e = threadIdx.x; e < kSub * kR; e += kThreads) {
        const int tt = e / kR, r = e % kR;
        if (tt < count && r < p.rank) {
          float total = 0.0f;
#pragma unroll
          for (int wp = 0; wp < kWarps; ++wp) total += warp_part[wp][tt][r];
          p.shrink_part[(blockIdx.x * p.tokens + t0 + tt) * p.rank + r] = total;
        }
      }
    }
    __syncthreads();  // s_tile and warp_part are rewritten by the next group
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

/// grad[j * g_j + r * g_r] += scale * sum over `parts` of part[.][j][r], for j < width, r < rank.
__global__ void reduce_parts_kernel(const float* part, int parts, std::int64_t width, int rank,
                                    float scale, float* grad, std::int64_t g_j, std::int64_t g_r) {
  const std::int64_t n = width * rank;
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  float total = 0.0f;
  for (int i = 0; i < parts; ++i) total += part[i * n + e];
  grad[(e / rank) * g_j + (e % rank) * g_r] += scale * total;
}

// ---- kernel launchers ----

int rounded_rank(std::int64_t rank) { return rank <= 8 ? 8 : rank <= 16 ? 16 : rank <= 32 ? 32 : 64; }

PassGrid pass_grid(std::int64_t tokens, std::int64_t width, std::int64_t rank) {
  PassGrid grid;
  const std::int64_t cols_per_block = kThreads * (64 / rounded_rank(rank));
  grid.col_blocks = (width + cols_per_block - 1) / cols_per_block;
  const std::int64_t groups = std::max<std::int64_t>(1, (tokens + kTokenGroup - 1) / kTokenGroup);
  const std::int64_t wanted = std::max<std::int64_t>(1, kTargetBlocks / grid.col_blocks);
  const std::int64_t groups_per_block = (groups + std::min(groups, wanted) - 1) / std::min(groups, wanted);
  grid.tokens_per_block = groups_per_block * kTokenGroup;
  grid.token_blocks = std::max<std::int64_t>(1, (tokens + grid.tokens_per_block - 1) / grid.tokens_per_block);
  return grid;
}

template <int kR, bool kShrink, bool kOuter, bool kExpand>
void launch_pass_r(const PassArgs& args, const PassGrid& grid, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(grid.col_blocks), static_cast<unsigned>(grid.token_blocks));
  lora_pass_kernel<kR, kShrink, kOuter, kExpand><<<blocks, kThreads, 0, stream>>>(args);
  QG_CUDA_CHECK(cudaGetLastError());
}

template <bool kShrink, bool kOuter, bool kExpand>
void launch_pass(PassArgs args, const PassGrid& grid, cudaStream_t stream) {
  args.tokens_per_block = grid.tokens_per_block;
  switch (rounded_rank(args.rank)) {
    case 8: return launch_pass_r<8, kShrink, kOuter, kExpand>(args, grid, stream);
    case 16: return launch_pass_r<16, kShrink, kOuter, kExpand>(args, grid, stream);
    case 32: return launch_pass_r<32, kShrink, kOuter, kExpand>(args, grid, stream);
    default: return launch_pass_r<64, kShrink, kOuter, kExpand>(args, grid, stream);
  }
}

void launch_reduce(const float* part, const PassGrid& grid, std::int64_t width, int rank,
                   float scale, float* grad, std::int64_t g_j, std::int64_t g_r,
                   cudaStream_t stream) {
  const std::int64_t n = width * rank;
  reduce_parts_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      part, static_cast<int>(grid.token_blocks), width, rank, scale, grad, g_j, g_r);
  QG_CUDA_CHECK(cudaGetLastError());
}

Dropout dropout_of(const LoraTrainShape& shape) {
  Dropout d;
  if (shape.dropout > 0.0f) {
    d.seed = shape.seed;
    // uniform = bits / 2^24 >= p  <=>  bits >= ceil(p * 2^24) (both sides exact in double).
    d.threshold = static_cast<std::uint32_t>(std::ceil(static_cast<double>(shape.dropout) * 16777216.0));
    d.keep_scale = 1.0f / (1.0f - shape.dropout);
  }
  return d;
}

/// A pass over the adapted linear's input side: x (or dx) [tokens, in] against A [rank, in],
/// under the dropout mask.
PassArgs input_side(const LoraTrainShape& shape, const float* a) {
  PassArgs p;
  p.tokens = shape.tokens;
  p.width = shape.in;
  p.w = a;
  p.w_r = shape.in;
  p.w_j = 1;
  p.rank = static_cast<int>(shape.rank);
  p.drop = dropout_of(shape);
  return p;
}

/// A pass over the output side: y (or dy) [tokens, out] against B [out, rank], no dropout.
PassArgs output_side(const LoraTrainShape& shape, const float* b) {
  PassArgs p;
  p.tokens = shape.tokens;
  p.width = shape.out;
  p.w = b;
  p.w_r = 1;
  p.w_j = shape.rank;
  p.rank = static_cast<int>(shape.rank);
  return p;
}

void check_shape(const LoraTrainShape& s, const char* op) {
  QG_CHECK(s.tokens >= 0 && s.tokens <= 0x7fffffff, op, ": ", s.tokens, " tokens");
  QG_CHECK(s.in > 0 && s.out > 0 && s.in % 8 == 0 && s.out % 8 == 0, op, ": in ", s.in,
           " and out ", s.out, " must be positive multiples of 8");
  QG_CHECK(s.rank >= 1 && s.rank <= 64, op, ": rank ", s.rank, " outside [1, 64]");
  QG_CHECK(s.dropout >= 0.0f && s.dropout < 1.0f, op, ": dropout ", s.dropout,
           " outside [0, 1)");
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
  return std::min(groups, std::max<std::int64_t>(1, kTargetBlocks / pass_grid(tokens, width, rank).col_blocks));
}

/// Bytes of the v partials at the front of the backward's workspace.
std::size_t v_part_bytes(const LoraTrainShape& s) {
  return floats_bytes(pass_grid(s.tokens, s.out, s.rank).col_blocks * s.tokens * s.rank);
}

}  // namespace

std::size_t lora_train_workspace_bytes(const LoraTrainShape& s) {
  const std::int64_t in_col_blocks = pass_grid(s.tokens, s.in, s.rank).col_blocks;
  const std::size_t forward = floats_bytes(in_col_blocks * s.tokens * s.rank);
  const std::size_t backward =
      v_part_bytes(s) +
      std::max(floats_bytes(token_blocks_bound(s.tokens, s.out, s.rank) * s.out * s.rank),
               floats_bytes(token_blocks_bound(s.tokens, s.in, s.rank) * s.in * s.rank));
  return std::max(forward, backward);
}

void lora_train_forward(const __half* x, const float* a, const float* b,
                        const LoraTrainShape& shape, __half* y, float* u, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream) {
  check_shape(shape, "lora_train_forward");
  QG_CHECK(x && a && b && y && u, "lora_train_forward: null pointer");
  QG_CHECK(aligned16(x) && aligned16(y), "lora_train_forward: x and y must be 16-byte aligned");
  check_workspace(shape, workspace, workspace_bytes, "lora_train_forward");
  if (shape.tokens == 0) return;
  const PassGrid in_side = pass_grid(shape.tokens, shape.in, shape.rank);
  const PassGrid out_side = pass_grid(shape.tokens, shape.out, shape.rank);
  auto* u_part = static_cast<float*>(workspace);

  PassArgs shrink = input_side(shape, a);  // u partials = dropout(x) A^T per column block
  shrink.in = x;
  shrink.shrink_part = u_part;
  launch_pass<true, false, false>(shrink, in_side, stream);

  PassArgs expand = output_side(shape, b);  // u = sum of the partials; y += scale u B^T
  expand.out = y;
  expand.s = u_part;
  expand.s_parts = static_cast<int>(in_side.col_blocks);
  expand.s_sum = u;
  expand.scale = shape.scale;
  launch_pass<false, false, true>(expand, out_side, stream);
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
  const PassGrid in_side = pass_grid(shape.tokens, shape.in, shape.rank);
  const PassGrid out_side = pass_grid(shape.tokens, shape.out, shape.rank);
  const int rank = static_cast<int>(shape.rank);
  auto* v_part = static_cast<float*>(workspace);
  auto* outer_part =
      reinterpret_cast<float*>(static_cast<char*>(workspace) + v_part_bytes(shape));
  const bool need_v = dx != nullptr || da != nullptr;

  PassArgs over_dy = output_side(shape, b);  // v partials = dy B; dB partials = dy^T u
  over_dy.in = dy;
  over_dy.s = u;
  over_dy.s_parts = 1;
  over_dy.shrink_part = v_part;
  over_dy.outer_part = outer_part;
  if (need_v && db != nullptr) {
    launch_pass<true, true, false>(over_dy, out_side, stream);
  } else if (need_v) {
    launch_pass<true, false, false>(over_dy, out_side, stream);
  } else {
    launch_pass<false, true, false>(over_dy, out_side, stream);
  }
  if (db != nullptr) {
    launch_reduce(outer_part, out_side, shape.out, rank, shape.scale, db, shape.rank, 1, stream);
  }
  if (!need_v) return;

  PassArgs over_x = input_side(shape, a);  // v = sum; dA partials = v^T x~; dx += drop'(v A)
  over_x.in = x;
  over_x.out = dx;
  over_x.s = v_part;
  over_x.s_parts = static_cast<int>(out_side.col_blocks);
  over_x.outer_part = outer_part;
  over_x.scale = shape.scale;
  if (da != nullptr && dx != nullptr) {
    launch_pass<false, true, true>(over_x, in_side, stream);
  } else if (da != nullptr) {
    launch_pass<false, true, false>(over_x, in_side, stream);
  } else {
    launch_pass<false, false, true>(over_x, in_side, stream);
  }
  if (da != nullptr) {
    launch_reduce(outer_part, in_side, shape.in, rank, shape.scale, da, 1, shape.in, stream);
  }
}

}  // namespace qg::cuda
