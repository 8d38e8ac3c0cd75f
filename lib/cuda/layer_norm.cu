// Row LayerNorm in fp16 with fp32 statistics (see include/qinggeng/cuda/layer_norm.h), and its
// training pair: the forward that also saves mean and rstd, and the backward.
//
// Forward: one 256-thread block per row and three passes over it (sum, centred sum of squares,
// normalise). Rows of up to kThreads * kUnits vectors (ChatGLM-6B's 4096: 2 vectors of 8 a
// thread) are held in registers after the first read; wider rows are read again for each pass,
// from L1/L2. The arithmetic is the same either way (every thread takes its vectors in the same
// order), so both give the same bits.
//
// Backward: two passes over a row (the two row sums, then dx), x, dy and gamma held in
// registers between them in the same way.
// dgamma and dbeta are column sums over all rows. Without them one block takes one row; with
// them a grid of about two blocks per SM strides over the rows and every block keeps its own
// partial column sums in shared memory (each thread always owns the same columns, so no
// shared atomics), added to dgamma/dbeta with one fp32 atomic per column and block at the end:
// rows x cols atomics become (blocks) x cols. Rows too wide for the shared partials fall back
// to one atomic per element.
#include <algorithm>
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "cuda/layer_norm_math.cuh"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kThreads = 256;

/// Where layer_norm_backward_kernel collects dgamma / dbeta.
enum class ParamGrads {
  None,    ///< frozen norm: neither is wanted
  Shared,  ///< per-block partial column sums in shared memory, flushed once per block
  Global,  ///< one fp32 atomic per element straight into dgamma / dbeta (very wide rows)
};

/// Row vectors a thread holds in registers between passes: up to 2 or 4 a thread (rows of
/// 4096 or 8192 fp16 with 8-wide vectors), 0 = re-read wider rows every pass.
int held_units(std::int64_t units) {
  return units <= 2 * kThreads ? 2 : units <= 4 * kThreads ? 4 : 0;
}

// ---- CUDA kernels ----

/// Calls f(i, u) for the vectors i of a row of `units` this thread owns (i = threadIdx.x +
/// u * kThreads, in increasing order): the u-th of at most kUnits, or (kUnits == 0) any number.
template <int kUnits, class F>
__device__ __forceinline__ void for_each_unit(std::int64_t units, F&& f) {
  if constexpr (kUnits > 0) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const std::int64_t i = threadIdx.x + static_cast<std::int64_t>(u) * kThreads;
      if (i < units) f(i, u);
    }
  } else {
    for (std::int64_t i = threadIdx.x; i < units; i += kThreads) f(i, 0);
  }
}

/// Vector i (this thread's u-th) of `row`: read once and then held (kUnits > 0), or read from
/// memory on every call (kUnits == 0).
template <int kVec, int kUnits>
struct HeldRow {
  const HalfVec<kVec>* row;
  HalfVec<kVec> held[kUnits > 0 ? kUnits : 1];

  __device__ HalfVec<kVec> first(std::int64_t i, int u) {
    const HalfVec<kVec> v = row[i];
    if constexpr (kUnits > 0) held[u] = v;
    return v;
  }
  __device__ HalfVec<kVec> again(std::int64_t i, int u) const {
    if constexpr (kUnits > 0) {
      return held[u];
    } else {
      return row[i];
    }
  }
};

/// Sum of `v` over the block; every thread gets the total.
__device__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

/// block_sum of two values at once (one pair of barriers).
__device__ float2 block_sum2(float2 v, float2* scratch) {
  for (int off = 16; off > 0; off /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float2 total{0.0f, 0.0f};
  for (int w = 0; w < kThreads / 32; ++w) {
    total.x += scratch[w].x;
    total.y += scratch[w].y;
  }
  return total;
}

/// One block per row; mean_out / rstd_out (both or neither) receive the row statistics. Rows of
/// at most kUnits * kThreads vectors stay in registers between the passes (kUnits > 0).
template <int kVec, int kUnits>
__global__ void __launch_bounds__(kThreads)
    layer_norm_kernel(const __half* x, const __half* gamma, const __half* beta, float eps,
                      std::int64_t cols, __half* out, float* mean_out, float* rstd_out) {
  __shared__ float scratch[kThreads / 32];
  const std::int64_t units = cols / kVec;
  HeldRow<kVec, kUnits> row{reinterpret_cast<const HalfVec<kVec>*>(x + blockIdx.x * cols)};
  HeldRow<kVec, kUnits> g{reinterpret_cast<const HalfVec<kVec>*>(gamma)};
  HeldRow<kVec, kUnits> bt{reinterpret_cast<const HalfVec<kVec>*>(beta)};
  auto* dst = reinterpret_cast<HalfVec<kVec>*>(out + blockIdx.x * cols);
  chain_release();
  chain_wait();

  float sum = 0.0f;
  for_each_unit<kUnits>(units, [&](std::int64_t i, int u) {
    const HalfVec<kVec> v = row.first(i, u);
    // Held rows: gamma and beta come with the row (their loads then overlap the two
    // reductions instead of following them); otherwise these loads are dead and the last pass
    // reads them.
    g.first(i, u);
    bt.first(i, u);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += __half2float(v.v[k]);
  });
  const float mean = layer_norm_mean(block_sum(sum, scratch), static_cast<float>(cols));
  float sq = 0.0f;
  for_each_unit<kUnits>(units, [&](std::int64_t i, int u) {
    const HalfVec<kVec> v = row.again(i, u);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sq = layer_norm_square_add(sq, __half2float(v.v[k]), mean);
  });
  const float inv = layer_norm_rstd(block_sum(sq, scratch), static_cast<float>(cols), eps);
  if (mean_out != nullptr && threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = inv;
  }
  for_each_unit<kUnits>(units, [&](std::int64_t i, int u) {
    dst[i] = layer_norm_vector(row.again(i, u), mean, inv, g.again(i, u), bt.again(i, u));
  });
}

/// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * gamma, xhat = (x - mean) rstd,
/// for rows blockIdx.x, blockIdx.x + gridDim.x, ...; dgamma += dy xhat and dbeta += dy summed
/// over the rows as kGrads says (dynamic shared memory: 2 * cols floats for Shared). x, dy and
/// gamma stay in registers between the two passes over a row (kUnits > 0).
template <int kVec, int kUnits, ParamGrads kGrads>
__global__ void __launch_bounds__(kThreads)
    layer_norm_backward_kernel(const __half* x, const __half* gamma, const float* mean,
                               const float* rstd, const __half* dy, std::int64_t rows,
                               std::int64_t cols, __half* dx, float* dgamma, float* dbeta) {
  chain_release();
  chain_wait();
  extern __shared__ float partial[];  // [2][cols]: dgamma, dbeta (Shared only)
  __shared__ float2 scratch[kThreads / 32];
  const std::int64_t units = cols / kVec;
  float* part_gamma = kGrads == ParamGrads::Shared ? partial : dgamma;
  float* part_beta = kGrads == ParamGrads::Shared ? partial + cols : dbeta;
  if constexpr (kGrads == ParamGrads::Shared) {
    for (std::int64_t c = threadIdx.x; c < 2 * cols; c += kThreads) partial[c] = 0.0f;
    __syncthreads();  // zeroed by column, accumulated by unit: other threads' columns
  }
  HeldRow<kVec, kUnits> gr{reinterpret_cast<const HalfVec<kVec>*>(gamma)};
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const std::int64_t base = row * cols;
    HeldRow<kVec, kUnits> xr{reinterpret_cast<const HalfVec<kVec>*>(x + base)};
    HeldRow<kVec, kUnits> dyr{reinterpret_cast<const HalfVec<kVec>*>(dy + base)};
    const float mu = mean[row], inv = rstd[row];
    float2 sums{0.0f, 0.0f};  // sum g, sum g xhat
    for_each_unit<kUnits>(units, [&](std::int64_t i, int u) {
      const HalfVec<kVec> xv = xr.first(i, u), dv = dyr.first(i, u), gv = gr.first(i, u);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float gd = __half2float(dv.v[k]) * __half2float(gv.v[k]);
        sums.x += gd;
        sums.y += gd * (__half2float(xv.v[k]) - mu) * inv;
      }
    });
    sums = block_sum2(sums, scratch);
    const float mean_g = sums.x / static_cast<float>(cols);
    const float mean_gx = sums.y / static_cast<float>(cols);
    auto* out = reinterpret_cast<HalfVec<kVec>*>(dx + base);
    for_each_unit<kUnits>(units, [&](std::int64_t i, int u) {
      const HalfVec<kVec> xv = xr.again(i, u), dv = dyr.again(i, u), gv = gr.again(i, u);
      HalfVec<kVec> r;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float xhat = (__half2float(xv.v[k]) - mu) * inv;
        const float d = __half2float(dv.v[k]);
        r.v[k] = __float2half_rn(inv * (d * __half2float(gv.v[k]) - mean_g - xhat * mean_gx));
        const std::int64_t c = i * kVec + k;
        if constexpr (kGrads == ParamGrads::Shared) {
          part_gamma[c] += d * xhat;
          part_beta[c] += d;
        } else if constexpr (kGrads == ParamGrads::Global) {
          if (part_gamma != nullptr) atomicAdd(part_gamma + c, d * xhat);
          if (part_beta != nullptr) atomicAdd(part_beta + c, d);
        }
      }
      out[i] = r;  // dx may alias dy: this unit was last read above, by this thread
    });
  }
  if constexpr (kGrads == ParamGrads::Shared) {
    __syncthreads();
    for (std::int64_t c = threadIdx.x; c < cols; c += kThreads) {
      if (dgamma != nullptr) atomicAdd(dgamma + c, part_gamma[c]);
      if (dbeta != nullptr) atomicAdd(dbeta + c, part_beta[c]);
    }
  }
}

// ---- kernel launchers ----

void check_sizes(std::int64_t rows, std::int64_t cols, float eps, const char* op) {
  QG_CHECK(rows >= 0 && cols > 0 && eps >= 0.0f, op, ": rows ", rows, ", cols ", cols, ", eps ",
           eps, " (need rows >= 0, cols > 0, eps >= 0)");
  QG_CHECK(rows <= 0x7fffffff, op, ": ", rows, " rows exceed one launch");
}

void launch_layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                       std::int64_t rows, std::int64_t cols, __half* out, float* mean,
                       float* rstd, cudaStream_t stream) {
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows);
  const bool vec8 =
      cols % 8 == 0 && aligned16(x) && aligned16(gamma) && aligned16(beta) && aligned16(out);
  const int held = held_units(vec8 ? cols / 8 : cols);
  auto* kernel = vec8 ? (held == 2   ? layer_norm_kernel<8, 2>
                         : held == 4 ? layer_norm_kernel<8, 4>
                                     : layer_norm_kernel<8, 0>)
                      : (held == 2   ? layer_norm_kernel<1, 2>
                         : held == 4 ? layer_norm_kernel<1, 4>
                                     : layer_norm_kernel<1, 0>);
  launch_chained(kernel, dim3(grid), dim3(kThreads), 0, stream, x, gamma, beta, eps, cols, out,
                 mean, rstd);
}

template <int kVec, ParamGrads kGrads>
void launch_backward(const __half* x, const __half* gamma, const float* mean, const float* rstd,
                     const __half* dy, std::int64_t rows, std::int64_t cols, __half* dx,
                     float* dgamma, float* dbeta, unsigned grid, std::size_t shared_bytes,
                     cudaStream_t stream) {
  // (Global mode is for rows far wider than any held row.)
  const int held = kGrads == ParamGrads::Global ? 0 : held_units(cols / kVec);
  auto* kernel = held == 2   ? layer_norm_backward_kernel<kVec, 2, kGrads>
                 : held == 4 ? layer_norm_backward_kernel<kVec, 4, kGrads>
                             : layer_norm_backward_kernel<kVec, 0, kGrads>;
  if (shared_bytes > 48 * 1024) {
    QG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(shared_bytes)));
  }
  launch_chained(kernel, dim3(grid), dim3(kThreads), shared_bytes, stream, x, gamma, mean, rstd, dy,
                 rows, cols, dx, dgamma, dbeta);
}

template <int kVec>
void launch_backward_vec(const __half* x, const __half* gamma, const float* mean,
                         const float* rstd, const __half* dy, std::int64_t rows,
                         std::int64_t cols, __half* dx, float* dgamma, float* dbeta,
                         cudaStream_t stream) {
  if (dgamma == nullptr && dbeta == nullptr) {
    return launch_backward<kVec, ParamGrads::None>(x, gamma, mean, rstd, dy, rows, cols, dx,
                                                   nullptr, nullptr,
                                                   static_cast<unsigned>(rows), 0, stream);
  }
  int device = 0, sms = 0, max_shared = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  QG_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const std::size_t shared_bytes = 2 * static_cast<std::size_t>(cols) * sizeof(float);
  if (shared_bytes + kThreads / 32 * sizeof(float2) > static_cast<std::size_t>(max_shared)) {
    return launch_backward<kVec, ParamGrads::Global>(x, gamma, mean, rstd, dy, rows, cols, dx,
                                                     dgamma, dbeta,
                                                     static_cast<unsigned>(rows), 0, stream);
  }
  const std::int64_t blocks = std::min<std::int64_t>(rows, 2 * static_cast<std::int64_t>(sms));
  launch_backward<kVec, ParamGrads::Shared>(x, gamma, mean, rstd, dy, rows, cols, dx, dgamma,
                                            dbeta, static_cast<unsigned>(blocks), shared_bytes,
                                            stream);
}

}  // namespace

void layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                std::int64_t rows, std::int64_t cols, __half* out, cudaStream_t stream) {
  QG_CHECK(x && gamma && beta && out, "layer_norm: null pointer");
  check_sizes(rows, cols, eps, "layer_norm");
  launch_layer_norm(x, gamma, beta, eps, rows, cols, out, nullptr, nullptr, stream);
}

void layer_norm_forward_stats(const __half* x, const __half* gamma, const __half* beta,
                              float eps, std::int64_t rows, std::int64_t cols, __half* out,
                              float* mean, float* rstd, cudaStream_t stream) {
  QG_CHECK(x && gamma && beta && out && mean && rstd, "layer_norm_forward_stats: null pointer");
  QG_CHECK(x != out, "layer_norm_forward_stats: out must not alias x (the backward reads x)");
  check_sizes(rows, cols, eps, "layer_norm_forward_stats");
  launch_layer_norm(x, gamma, beta, eps, rows, cols, out, mean, rstd, stream);
}

void layer_norm_backward(const __half* x, const __half* gamma, const float* mean,
                         const float* rstd, const __half* dy, std::int64_t rows,
                         std::int64_t cols, __half* dx, float* dgamma, float* dbeta,
                         cudaStream_t stream) {
  QG_CHECK(x && gamma && mean && rstd && dy && dx, "layer_norm_backward: null pointer");
  check_sizes(rows, cols, 0.0f, "layer_norm_backward");
  if (rows == 0) return;
  if (cols % 8 == 0 && aligned16(x) && aligned16(gamma) && aligned16(dy) && aligned16(dx)) {
    launch_backward_vec<8>(x, gamma, mean, rstd, dy, rows, cols, dx, dgamma, dbeta, stream);
  } else {
    launch_backward_vec<1>(x, gamma, mean, rstd, dy, rows, cols, dx, dgamma, dbeta, stream);
  }
}

}  // namespace qg::cuda
