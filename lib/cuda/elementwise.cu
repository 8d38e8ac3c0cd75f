// Small fp16 ops (see include/qinggeng/cuda/elementwise.h). Every kernel is a grid-stride loop
// over "units": 8 halves (one 16-byte access) when the launcher found sizes and pointers
// aligned, else single halves. The row gathers and the row scatter share one kernel for int32
// and int64 indices; gelu, its out-of-place form and its backward share one kernel. The
// embedding backward is a scatter-add: one fp32 atomic per element, since ids repeat
// arbitrarily.
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gelu.cuh"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

unsigned grid_for(std::int64_t units) {
  const std::int64_t blocks = (units + 255) / 256;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks));
}

// ---- CUDA kernels ----

/// out = gelu(x) when dy is null, else out = gelu'(x) * dy; out may alias x or dy.
template <int kVec>
__global__ void gelu_kernel(const __half* x, const __half* dy, __half* out, std::int64_t units) {
  chain_release();
  chain_wait();
  const auto* px = reinterpret_cast<const HalfVec<kVec>*>(x);
  const auto* pd = reinterpret_cast<const HalfVec<kVec>*>(dy);
  auto* po = reinterpret_cast<HalfVec<kVec>*>(out);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < units;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const HalfVec<kVec> v = px[i];
    HalfVec<kVec> r;
    if (pd == nullptr) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) r.v[k] = __float2half_rn(gelu_tanh(__half2float(v.v[k])));
    } else {
      const HalfVec<kVec> d = pd[i];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        r.v[k] = __float2half_rn(gelu_tanh_grad(__half2float(v.v[k])) * __half2float(d.v[k]));
      }
    }
    po[i] = r;
  }
}

/// dtable[ids[r], c] += dout[r, c] over units of kVec columns (units_per_row per row).
template <int kVec>
__global__ void embedding_backward_kernel(const int* ids, std::int64_t n, const __half* dout,
                                          std::int64_t vocab, std::int64_t units_per_row,
                                          float* dtable) {
  const auto* pd = reinterpret_cast<const HalfVec<kVec>*>(dout);
  const std::int64_t units = n * units_per_row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < units;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / units_per_row, c = i % units_per_row;
    const std::int64_t id = ids[r];
    if (id < 0 || id >= vocab) continue;
    const HalfVec<kVec> d = pd[i];
    float* dst = dtable + (id * units_per_row + c) * kVec;
#pragma unroll
    for (int k = 0; k < kVec; ++k) atomicAdd(dst + k, __half2float(d.v[k]));
  }
}

template <int kVec>
__global__ void scaled_add_kernel(const __half* a, float alpha, const __half* b, __half* out,
                                  std::int64_t units) {
  const auto* pa = reinterpret_cast<const HalfVec<kVec>*>(a);
  const auto* pb = reinterpret_cast<const HalfVec<kVec>*>(b);
  auto* po = reinterpret_cast<HalfVec<kVec>*>(out);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < units;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const HalfVec<kVec> va = pa[i], vb = pb[i];
    HalfVec<kVec> r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      r.v[k] = __float2half_rn(__half2float(va.v[k]) * alpha + __half2float(vb.v[k]));
    }
    po[i] = r;
  }
}

/// Row copies through an index, `units_per_row` units of kVec halves per row. Gather
/// (kScatter false): out row i = x row index[i], zeros where index[i] is outside
/// [0, indexed_rows) (x's rows). Scatter: out row index[i] = x row i, skipped where index[i] is
/// outside [0, indexed_rows) (out's rows).
template <int kVec, typename Index, bool kScatter>
__global__ void row_copy_kernel(const __half* x, std::int64_t indexed_rows, const Index* index,
                                std::int64_t n, std::int64_t units_per_row, __half* out) {
  chain_release();
  chain_wait();
  const auto* px = reinterpret_cast<const HalfVec<kVec>*>(x);
  auto* po = reinterpret_cast<HalfVec<kVec>*>(out);
  const std::int64_t units = n * units_per_row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < units;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / units_per_row, c = i % units_per_row;
    const std::int64_t other = static_cast<std::int64_t>(index[r]);
    const bool valid = other >= 0 && other < indexed_rows;
    if constexpr (kScatter) {
      if (valid) po[other * units_per_row + c] = px[i];
    } else {
      HalfVec<kVec> v{};
      if (valid) v = px[other * units_per_row + c];
      po[i] = v;
    }
  }
}

template <bool kScatter, typename Index>
void launch_row_copy(const __half* x, std::int64_t indexed_rows, std::int64_t cols,
                     const Index* index, std::int64_t n, __half* out, cudaStream_t stream,
                     const char* what) {
  QG_CHECK(x && index && out && cols > 0 && n >= 0 && indexed_rows > 0, what,
           ": null pointer or bad size (rows ", indexed_rows, ", cols ", cols, ", n ", n, ")");
  if (n == 0) return;
  if (cols % 8 == 0 && aligned16(x) && aligned16(out)) {
    launch_chained(row_copy_kernel<8, Index, kScatter>, dim3(grid_for(n * cols / 8)), dim3(256), 0,
                   stream, x, indexed_rows, index, n, cols / 8, out);
  } else {
    launch_chained(row_copy_kernel<1, Index, kScatter>, dim3(grid_for(n * cols)), dim3(256), 0,
                   stream, x, indexed_rows, index, n, cols, out);
  }
}

/// gelu_kernel over `count` values: vectorised when sizes and every pointer allow.
void launch_gelu(const __half* x, const __half* dy, std::int64_t count, __half* out,
                 cudaStream_t stream, const char* op) {
  QG_CHECK(x && out && count >= 0, op, ": null pointer or negative count ", count);
  if (count == 0) return;
  const bool vec8 =
      count % 8 == 0 && aligned16(x) && aligned16(out) && (dy == nullptr || aligned16(dy));
  const std::int64_t units = vec8 ? count / 8 : count;
  launch_chained(vec8 ? gelu_kernel<8> : gelu_kernel<1>, dim3(grid_for(units)), dim3(256), 0,
                 stream, x, dy, out, units);
}

}  // namespace

// ---- kernel launchers ----

void embedding(const __half* table, std::int64_t vocab, std::int64_t cols, const int* ids,
               std::int64_t n, __half* out, cudaStream_t stream) {
  launch_row_copy<false>(table, vocab, cols, ids, n, out, stream, "embedding");
}

void gather_rows(const __half* x, std::int64_t x_rows, std::int64_t cols,
                 const std::int64_t* rows, std::int64_t n, __half* out, cudaStream_t stream) {
  launch_row_copy<false>(x, x_rows, cols, rows, n, out, stream, "gather_rows");
}

void scatter_rows(const __half* x, std::int64_t n, std::int64_t cols, const std::int64_t* rows,
                  __half* out, std::int64_t out_rows, cudaStream_t stream) {
  launch_row_copy<true>(x, out_rows, cols, rows, n, out, stream, "scatter_rows");
}

void gelu_tanh(__half* x, std::int64_t count, cudaStream_t stream) {
  launch_gelu(x, nullptr, count, x, stream, "gelu_tanh");
}

void gelu_tanh_out(const __half* x, std::int64_t count, __half* out, cudaStream_t stream) {
  launch_gelu(x, nullptr, count, out, stream, "gelu_tanh_out");
}

void gelu_tanh_backward(const __half* x, const __half* dy, std::int64_t count, __half* dx,
                        cudaStream_t stream) {
  QG_CHECK(dy != nullptr, "gelu_tanh_backward: null dy");
  launch_gelu(x, dy, count, dx, stream, "gelu_tanh_backward");
}

void embedding_backward(const int* ids, std::int64_t n, const __half* dout, std::int64_t vocab,
                        std::int64_t cols, float* dtable, cudaStream_t stream) {
  QG_CHECK(ids && dout && dtable, "embedding_backward: null pointer");
  QG_CHECK(n >= 0 && vocab > 0 && cols > 0, "embedding_backward: bad size (n ", n, ", vocab ",
           vocab, ", cols ", cols, ")");
  if (n == 0) return;
  if (cols % 8 == 0 && aligned16(dout)) {
    embedding_backward_kernel<8><<<grid_for(n * cols / 8), 256, 0, stream>>>(
        ids, n, dout, vocab, cols / 8, dtable);
  } else {
    embedding_backward_kernel<1><<<grid_for(n * cols), 256, 0, stream>>>(ids, n, dout, vocab,
                                                                         cols, dtable);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

void scaled_add(const __half* a, float alpha, const __half* b, std::int64_t count, __half* out,
                cudaStream_t stream) {
  QG_CHECK(a && b && out && count >= 0, "scaled_add: null pointer or negative count ", count);
  if (count == 0) return;
  if (count % 8 == 0 && aligned16(a) && aligned16(b) && aligned16(out)) {
    scaled_add_kernel<8><<<grid_for(count / 8), 256, 0, stream>>>(a, alpha, b, out, count / 8);
  } else {
    scaled_add_kernel<1><<<grid_for(count), 256, 0, stream>>>(a, alpha, b, out, count);
  }
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
