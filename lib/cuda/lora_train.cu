// LoRA of a training step (include/qinggeng/cuda/lora_train.h). Three memory-bound kernels,
// each used twice, with fp32 accumulation and fp32 factors read in place:
//
//   shrink  s[t, r] = sum_i in[t, i] W(r, i)          u = dropout(x) A^T,  v = dy B
//   expand  o[t, j] += scale sum_r s[t, r] W(r, j)     y += scale u B^T,   dx += scale v A
//   outer   G(j, r) += scale sum_t in[t, j] s[t, r]    dB += scale dy^T u, dA += scale v^T x~
//
// W(r, i) is read through strides, so A [rank, in] and B [out, rank] serve every role without
// copies; `dropout` selects the inverted-dropout mask of reference_backward.h's dropout_keep
// (splitmix64 of seed and t * in + i), drawn again wherever x appears.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/check.h"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kOuterTokens = 32;  // tokens per block of the outer-product reduction

/// The dropout of one call: element index t * in + i of x is kept (and scaled by keep_scale)
/// iff its hash is >= p. Disabled when p <= 0.
struct Dropout {
  std::uint64_t seed = 0;
  float p = 0.0f;
  float keep_scale = 1.0f;
};

__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The factor dropout applies to element `index`: 0, or 1 / (1 - p).
__device__ __forceinline__ float dropout_factor(const Dropout& d, std::uint64_t index) {
  if (d.p <= 0.0f) return 1.0f;
  const std::uint64_t bits = splitmix64(d.seed ^ splitmix64(index));
  const double uniform = static_cast<double>(bits >> 40) * (1.0 / 16777216.0);
  return uniform >= d.p ? d.keep_scale : 0.0f;
}

// ---- CUDA kernels ----

/// One block per token: s[t, r] = sum_i drop(in[t, i]) w[r * w_r + i * w_i], r < rank <= kR.
/// Consecutive threads take consecutive i, so both in and w (either layout) are read in
/// coalesced runs; the threads' partial sums are then added across warps.
template <int kR>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const __half* in, std::int64_t width, const float* w, std::int64_t w_r,
                  std::int64_t w_i, int rank, Dropout drop, float* s) {
  __shared__ float partial[kWarps][kR];
  const std::int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float acc[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) acc[r] = 0.0f;
  const __half* row = in + t * width;
  for (std::int64_t i = threadIdx.x; i < width; i += kThreads) {
    const float xv =
        __half2float(row[i]) * dropout_factor(drop, static_cast<std::uint64_t>(t * width + i));
    const float* wi = w + i * w_i;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r < rank) acc[r] += xv * wi[r * w_r];
    }
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    float a = acc[r];
    for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (lane == 0) partial[warp][r] = a;
  }
  __syncthreads();
  if (threadIdx.x < rank) {
    float total = 0.0f;
#pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) total += partial[wp][threadIdx.x];
    s[t * rank + threadIdx.x] = total;
  }
}

/// out[t, j] += scale * drop(sum_r s[t, r] w[r * w_r + j * w_j]), one j per thread (consecutive
/// threads, consecutive j); grid (column blocks, tokens).
template <int kR>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const float* s, std::int64_t width, const float* w, std::int64_t w_r,
                  std::int64_t w_j, int rank, float scale, Dropout drop, __half* out) {
  __shared__ float srow[kR];
  const std::int64_t t = blockIdx.y;
  if (threadIdx.x < kR) srow[threadIdx.x] = threadIdx.x < rank ? s[t * rank + threadIdx.x] : 0.0f;
  __syncthreads();
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= width) return;
  const float* wj = w + j * w_j;
  float acc = 0.0f;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    if (r < rank) acc += srow[r] * wj[r * w_r];
  }
  acc *= scale * dropout_factor(drop, static_cast<std::uint64_t>(t * width + j));
  __half* o = out + t * width + j;
  *o = __float2half_rn(__half2float(*o) + acc);
}

/// g[j * g_j + r * g_r] += scale * sum_t drop(in[t, j]) s[t, r] over kOuterTokens tokens per
/// block (grid: column groups of kThreads, token chunks), fp32 atomics across chunks.
template <int kR>
__global__ void __launch_bounds__(kThreads)
    outer_kernel(const __half* in, std::int64_t tokens, std::int64_t width, const float* s,
                 int rank, float scale, Dropout drop, float* g, std::int64_t g_j,
                 std::int64_t g_r) {
  __shared__ float stile[kOuterTokens][kR];
  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.y) * kOuterTokens;
  const int count = static_cast<int>(std::min<std::int64_t>(kOuterTokens, tokens - t0));
  for (int e = threadIdx.x; e < kOuterTokens * kR; e += kThreads) {
    const int tt = e / kR, r = e % kR;
    stile[tt][r] = (tt < count && r < rank) ? s[(t0 + tt) * rank + r] : 0.0f;
  }
  __syncthreads();
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= width) return;
  float acc[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) acc[r] = 0.0f;
  for (int tt = 0; tt < count; ++tt) {
    const std::int64_t t = t0 + tt;
    const float xv = __half2float(in[t * width + j]) *
                     dropout_factor(drop, static_cast<std::uint64_t>(t * width + j));
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] += xv * stile[tt][r];
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    if (r < rank) atomicAdd(g + j * g_j + r * g_r, scale * acc[r]);
  }
}

// ---- kernel launchers ----

/// Calls fn(std::integral_constant<int, kR>) with the smallest compiled rank bucket >= rank.
template <class Fn>
void with_rank_bucket(int rank, Fn&& fn) {
  if (rank <= 8) {
    fn(std::integral_constant<int, 8>{});
  } else if (rank <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (rank <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else {
    fn(std::integral_constant<int, 64>{});
  }
}

void launch_shrink(const __half* in, std::int64_t tokens, std::int64_t width, const float* w,
                   std::int64_t w_r, std::int64_t w_i, int rank, const Dropout& drop, float* s,
                   cudaStream_t stream) {
  with_rank_bucket(rank, [&](auto bucket) {
    shrink_kernel<decltype(bucket)::value><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
        in, width, w, w_r, w_i, rank, drop, s);
  });
  QG_CUDA_CHECK(cudaGetLastError());
}

void launch_expand(const float* s, std::int64_t tokens, std::int64_t width, const float* w,
                   std::int64_t w_r, std::int64_t w_j, int rank, float scale, const Dropout& drop,
                   __half* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((width + kThreads - 1) / kThreads),
                  static_cast<unsigned>(tokens));
  with_rank_bucket(rank, [&](auto bucket) {
    expand_kernel<decltype(bucket)::value><<<grid, kThreads, 0, stream>>>(s, width, w, w_r, w_j,
                                                                          rank, scale, drop, out);
  });
  QG_CUDA_CHECK(cudaGetLastError());
}

void launch_outer(const __half* in, std::int64_t tokens, std::int64_t width, const float* s,
                  int rank, float scale, const Dropout& drop, float* g, std::int64_t g_j,
                  std::int64_t g_r, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((width + kThreads - 1) / kThreads),
                  static_cast<unsigned>((tokens + kOuterTokens - 1) / kOuterTokens));
  with_rank_bucket(rank, [&](auto bucket) {
    outer_kernel<decltype(bucket)::value><<<grid, kThreads, 0, stream>>>(
        in, tokens, width, s, rank, scale, drop, g, g_j, g_r);
  });
  QG_CUDA_CHECK(cudaGetLastError());
}

Dropout dropout_of(const LoraTrainShape& shape) {
  Dropout d;
  d.seed = shape.seed;
  d.p = shape.dropout;
  d.keep_scale = shape.dropout > 0.0f ? 1.0f / (1.0f - shape.dropout) : 1.0f;
  return d;
}

void check_shape(const LoraTrainShape& s, const char* op) {
  QG_CHECK(s.tokens >= 0 && s.tokens <= 0x7fffffff, op, ": ", s.tokens, " tokens");
  QG_CHECK(s.in > 0 && s.out > 0 && s.in % 8 == 0 && s.out % 8 == 0, op, ": in ", s.in,
           " and out ", s.out, " must be positive multiples of 8");
  QG_CHECK(s.rank >= 1 && s.rank <= 64, op, ": rank ", s.rank, " outside [1, 64]");
  QG_CHECK(s.dropout >= 0.0f && s.dropout < 1.0f, op, ": dropout ", s.dropout,
           " outside [0, 1)");
}

}  // namespace

std::size_t lora_train_workspace_bytes(const LoraTrainShape& shape) {
  return static_cast<std::size_t>(std::max<std::int64_t>(shape.tokens, 1) *
                                  std::max<std::int64_t>(shape.rank, 1)) * sizeof(float);
}

void lora_train_forward(const __half* x, const float* a, const float* b,
                        const LoraTrainShape& shape, __half* y, float* u, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream) {
  check_shape(shape, "lora_train_forward");
  QG_CHECK(x && a && b && y && u, "lora_train_forward: null pointer");
  (void)workspace, (void)workspace_bytes;  // u is the only intermediate
  if (shape.tokens == 0) return;
  const int r = static_cast<int>(shape.rank);
  launch_shrink(x, shape.tokens, shape.in, a, shape.in, 1, r, dropout_of(shape), u, stream);
  launch_expand(u, shape.tokens, shape.out, b, 1, shape.rank, r, shape.scale, Dropout{}, y,
                stream);
}

void lora_train_backward(const __half* x, const float* a, const float* b, const float* u,
                         const __half* dy, const LoraTrainShape& shape, __half* dx, float* da,
                         float* db, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  check_shape(shape, "lora_train_backward");
  QG_CHECK(x && a && b && u && dy, "lora_train_backward: null pointer");
  QG_CHECK(workspace != nullptr && workspace_bytes >= lora_train_workspace_bytes(shape),
           "lora_train_backward: workspace of ", workspace_bytes, " bytes, need ",
           lora_train_workspace_bytes(shape));
  if (shape.tokens == 0) return;
  const int r = static_cast<int>(shape.rank);
  const Dropout drop = dropout_of(shape);
  float* v = static_cast<float*>(workspace);  // dy B  [tokens, rank]
  if (db != nullptr) {
    launch_outer(dy, shape.tokens, shape.out, u, r, shape.scale, Dropout{}, db, shape.rank, 1,
                 stream);
  }
  if (da == nullptr && dx == nullptr) return;
  launch_shrink(dy, shape.tokens, shape.out, b, 1, shape.rank, r, Dropout{}, v, stream);
  if (da != nullptr) {
    launch_outer(x, shape.tokens, shape.in, v, r, shape.scale, drop, da, 1, shape.in, stream);
  }
  if (dx != nullptr) {
    launch_expand(v, shape.tokens, shape.in, a, shape.in, 1, r, shape.scale, drop, dx, stream);
  }
}

}  // namespace qg::cuda
