// Runtime multi-adapter LoRA on tensor cores (see cuda/lora.h): the device registry of
// factors (GpuLoraStack) and the two kernels of y += scale * (x A^T) B^T.
//
// Rows pick adapters freely, so a tile of rows may need several adapters: each block walks the
// distinct ids of its rows in increasing order and, per id, computes with the rows of that id
// live and the others masked (their fragments zeroed, their results not stored). With one
// adapter per sequence, a tile almost always holds one or two ids.
#include "qinggeng/cuda/lora.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <string>
#include <tuple>

#include "cuda/check.h"
#include "cuda/mma_tiles.cuh"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Device helpers

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kShrinkRows = 16;     // one m16 tile of rows per shrink block
constexpr int kExpandRows = 64;     // four m16 tiles per expand block
constexpr int kExpandCols = 128;    // 32 columns (four n8 tiles) per warp
constexpr int kMaxSplits = 32;      // K-splits of the shrink: partial sums in the workspace
constexpr int kTargetBlocks = 264;  // enough shrink blocks to fill two waves on 132 SMs

/// The adapter row t uses here, or -1 (past the end, no adapter, unknown or empty slot).
__device__ __forceinline__ int row_adapter(const std::int32_t* ids, std::int64_t t,
                                           std::int64_t tokens, const LoraLayerView& v) {
  if (t >= tokens) return -1;
  const int a = ids[t];
  if (a < 0 || a >= v.capacity || v.scales[a] == 0.0f) return -1;
  return a;
}

/// Smallest id in ids_s[0, n) that is greater than `prev`, or INT_MAX when none is.
__device__ __forceinline__ int next_adapter(const int* ids_s, int n, int prev) {
  int next = INT_MAX;
  for (int i = 0; i < n; ++i) {
    const int a = ids_s[i];
    if (a > prev && a < next) next = a;
  }
  return next;
}

/// Two consecutive fp16 values as one 32-bit fragment register (read-only path), or 0.
__device__ __forceinline__ std::uint32_t load_pair(const __half* p, bool valid) {
  return valid ? __ldg(reinterpret_cast<const unsigned int*>(p)) : 0u;
}

// ---------------------------------------------------------------------------------------------
// Kernels

/// Shrink: partial[split, t, :] = x[t, k-range of split] · A_a[:, k-range]^T for the rows t of
/// one 16-row tile; the four warps take interleaved 16-wide K steps and are summed in shared
/// memory. Rank is padded to R16 * 16 (zero rows of A).
template <int R16>
__global__ void __launch_bounds__(kThreads)
    lora_shrink_kernel(LoraLayerView v, const __half* __restrict__ x, const std::int32_t* ids,
                       std::int64_t tokens, float* __restrict__ partial, int k_per_split) {
  constexpr int RP = R16 * 16, NT = RP / 8;
  __shared__ int ids_s[kShrinkRows];
  __shared__ float red[kWarps][kShrinkRows][RP];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * kShrinkRows;
  const int split = blockIdx.y;
  const std::int64_t k_begin = static_cast<std::int64_t>(split) * k_per_split;
  const std::int64_t k_end = std::min<std::int64_t>(v.in, k_begin + k_per_split);
  if (threadIdx.x < kShrinkRows) ids_s[threadIdx.x] = row_adapter(ids, m0 + threadIdx.x, tokens, v);
  __syncthreads();

  for (int a = next_adapter(ids_s, kShrinkRows, -1); a != INT_MAX;
       a = next_adapter(ids_s, kShrinkRows, a)) {
    const bool live0 = ids_s[g] == a, live1 = ids_s[g + 8] == a;
    const __half* x0 = x + (m0 + g) * v.in + 2 * c;
    const __half* x1 = x + (m0 + g + 8) * v.in + 2 * c;
    const __half* a_rows = reinterpret_cast<const __half*>(v.a) +
                           (static_cast<std::int64_t>(a) * RP + g) * v.in + 2 * c;
    float acc[NT][4] = {};
#pragma unroll 4
    for (std::int64_t k = k_begin + warp * 16; k < k_end; k += kWarps * 16) {
      const bool hi = k + 8 < k_end;  // in % 8 == 0: the upper 8 columns exist or not at all
      const std::uint32_t frag[4] = {load_pair(x0 + k, live0), load_pair(x1 + k, live1),
                                     load_pair(x0 + k + 8, live0 && hi),
                                     load_pair(x1 + k + 8, live1 && hi)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const __half* arow = a_rows + static_cast<std::int64_t>(j) * 8 * v.in;
        tiles::mma_16816(acc[j], frag, load_pair(arow + k, true), load_pair(arow + k + 8, hi));
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      red[warp][g][j * 8 + 2 * c] = acc[j][0];
      red[warp][g][j * 8 + 2 * c + 1] = acc[j][1];
      red[warp][g + 8][j * 8 + 2 * c] = acc[j][2];
      red[warp][g + 8][j * 8 + 2 * c + 1] = acc[j][3];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kShrinkRows * RP; e += kThreads) {
      const int row = e / RP, col = e % RP;
      if (ids_s[row] != a) continue;
      float sum = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][row][col];
      partial[(static_cast<std::int64_t>(split) * tokens + m0 + row) * RP + col] = sum;
    }
    __syncthreads();  // red is rewritten for the next adapter
  }
}

/// Expand: y[t, cols] += scale_a * u[t, :] · B_a[cols, :]^T for a 64-row x 128-column tile,
/// u being the sum of the shrink's K-split partials, rounded to fp16 once in shared memory.
/// Each lane loads its y values once up front (all loads in flight together, rather than one
/// dependent load-add-store at a time), every adapter pass updates its own rows in registers,
/// and the tile is stored once at the end.
template <int R16>
__global__ void __launch_bounds__(kThreads)
    lora_expand_kernel(LoraLayerView v, const std::int32_t* ids, std::int64_t tokens,
                       const float* __restrict__ partial, int splits, __half* y) {
  constexpr int RP = R16 * 16, kStride = RP + 8;  // +8 halves: conflict-free fragment reads
  constexpr int kTiles = kExpandRows / 16;
  __shared__ int ids_s[kExpandRows];
  __shared__ __half u_s[kExpandRows][kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.y) * kExpandRows;
  const std::int64_t n_warp = static_cast<std::int64_t>(blockIdx.x) * kExpandCols + warp * 32;
  if (threadIdx.x < kExpandRows) ids_s[threadIdx.x] = row_adapter(ids, m0 + threadIdx.x, tokens, v);
  __syncthreads();

  // y[m0 + mt * 16 + g + 8 * half, n_warp + j * 8 + 2c .. +1] as fp16x2, rows with an adapter.
  __half2 yv[kTiles][4][2];
  // The pair of y this lane owns in (m-tile mt, n-tile j, row half), or null when the row has
  // no adapter or the columns are past the end.
  auto y_pair = [&](int mt, int j, int half) -> __half2* {
    const int row = mt * 16 + g + 8 * half;
    const std::int64_t col = n_warp + j * 8 + 2 * c;
    if (ids_s[row] < 0 || col >= v.out) return nullptr;
    return reinterpret_cast<__half2*>(y + (m0 + row) * v.out + col);
  };
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const __half2* p = y_pair(mt, j, half);
        yv[mt][j][half] = p ? *p : __half2{};
      }

  for (int e = threadIdx.x; e < kExpandRows * RP; e += kThreads) {
    const int row = e / RP, col = e % RP;
    float sum = 0;
    if (ids_s[row] >= 0) {
#pragma unroll 4
      for (int s = 0; s < splits; ++s)
        sum += partial[(static_cast<std::int64_t>(s) * tokens + m0 + row) * RP + col];
    }
    u_s[row][col] = __float2half_rn(sum);
  }
  __syncthreads();

  for (int a = next_adapter(ids_s, kExpandRows, -1); a != INT_MAX;
       a = next_adapter(ids_s, kExpandRows, a)) {
    const float scale = v.scales[a];
    const __half* b_base = reinterpret_cast<const __half*>(v.b) + static_cast<std::int64_t>(a) * v.out * RP;
    std::uint32_t bf[4][R16][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t n = n_warp + j * 8 + g;
      const bool valid = n < v.out;
      const __half* brow = b_base + (valid ? n : 0) * RP + 2 * c;
#pragma unroll
      for (int s = 0; s < R16; ++s) {
        bf[j][s][0] = load_pair(brow + s * 16, valid);
        bf[j][s][1] = load_pair(brow + s * 16 + 8, valid);
      }
    }
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt) {
      const int r0 = mt * 16 + g;
      const bool live[2] = {ids_s[r0] == a, ids_s[r0 + 8] == a};
      if (!__any_sync(0xffffffffu, live[0] || live[1])) continue;
      float acc[4][4] = {};
#pragma unroll
      for (int s = 0; s < R16; ++s) {
        const std::uint32_t frag[4] = {
            *reinterpret_cast<const std::uint32_t*>(&u_s[r0][s * 16 + 2 * c]),
            *reinterpret_cast<const std::uint32_t*>(&u_s[r0 + 8][s * 16 + 2 * c]),
            *reinterpret_cast<const std::uint32_t*>(&u_s[r0][s * 16 + 8 + 2 * c]),
            *reinterpret_cast<const std::uint32_t*>(&u_s[r0 + 8][s * 16 + 8 + 2 * c])};
#pragma unroll
        for (int j = 0; j < 4; ++j) tiles::mma_16816(acc[j], frag, bf[j][s][0], bf[j][s][1]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (!live[half]) continue;
          const float2 old = __half22float2(yv[mt][j][half]);
          yv[mt][j][half] = __floats2half2_rn(old.x + scale * acc[j][2 * half],
                                              old.y + scale * acc[j][2 * half + 1]);
        }
    }
  }

#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (__half2* p = y_pair(mt, j, half)) *p = yv[mt][j][half];
      }
}

// ---------------------------------------------------------------------------------------------
// Launch planning

struct ShrinkPlan {
  int splits = 1;
  int k_per_split = 0;  // multiple of 16
};

/// K-splits so that small batches still spread over the GPU; depends only on the sizes, so
/// the same problem always sums in the same order.
ShrinkPlan plan_shrink(std::int64_t in, std::int64_t tokens) {
  const std::int64_t row_tiles = (tokens + kShrinkRows - 1) / kShrinkRows;
  std::int64_t splits = std::clamp<std::int64_t>((kTargetBlocks + row_tiles - 1) / row_tiles, 1,
                                                 kMaxSplits);
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, in / (kWarps * 16)));
  ShrinkPlan p;
  p.k_per_split = static_cast<int>(((in + splits - 1) / splits + 15) / 16 * 16);
  p.splits = static_cast<int>((in + p.k_per_split - 1) / p.k_per_split);
  return p;
}

template <int R16>
void launch(const LoraLayerView& v, const __half* x, __half* y, std::int64_t tokens,
            const std::int32_t* ids, float* partial, const ShrinkPlan& plan, cudaStream_t stream) {
  const dim3 shrink_grid(static_cast<unsigned>((tokens + kShrinkRows - 1) / kShrinkRows),
                         static_cast<unsigned>(plan.splits));
  lora_shrink_kernel<R16><<<shrink_grid, kThreads, 0, stream>>>(v, x, ids, tokens, partial,
                                                                 plan.k_per_split);
  QG_CUDA_CHECK(cudaGetLastError());
  const dim3 expand_grid(static_cast<unsigned>((v.out + kExpandCols - 1) / kExpandCols),
                         static_cast<unsigned>((tokens + kExpandRows - 1) / kExpandRows));
  lora_expand_kernel<R16><<<expand_grid, kThreads, 0, stream>>>(v, ids, tokens, partial,
                                                                 plan.splits, y);
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// GpuLoraStack

GpuLoraStack::GpuLoraStack(lora::LoraTarget target, const io::ModelConfig& model, int capacity,
                           int max_rank)
    : target_(target), num_layers_(static_cast<int>(model.num_layers)), capacity_(capacity),
      max_rank_(max_rank) {
  QG_CHECK(capacity >= 1, "GpuLoraStack: capacity must be at least 1, got ", capacity);
  QG_CHECK(max_rank >= 1 && max_rank <= kLoraMaxRank, "GpuLoraStack: max_rank must be in [1, ",
           kLoraMaxRank, "], got ", max_rank);
  QG_CHECK(num_layers_ >= 1, "GpuLoraStack: the model has no layers");
  std::tie(in_, out_) = lora::target_features(target, model);
  QG_CHECK(in_ > 0 && out_ > 0 && in_ % 8 == 0 && out_ % 8 == 0, "GpuLoraStack: ",
           lora::target_module(target), " is [", out_, ", ", in_,
           "]; both sizes must be positive multiples of 8");
  rank_padded_ = (max_rank + 15) / 16 * 16;
  const std::size_t per_layer = static_cast<std::size_t>(capacity_) * rank_padded_;
  const std::size_t a_count = per_layer * num_layers_ * in_, b_count = per_layer * num_layers_ * out_;
  host_scales_.assign(static_cast<std::size_t>(capacity_), 0.0f);
  try {
    QG_CUDA_CHECK(cudaMalloc(&a_, a_count * 2));
    QG_CUDA_CHECK(cudaMalloc(&b_, b_count * 2));
    QG_CUDA_CHECK(cudaMalloc(&scales_, host_scales_.size() * sizeof(float)));
    QG_CUDA_CHECK(cudaMemset(a_, 0, a_count * 2));
    QG_CUDA_CHECK(cudaMemset(b_, 0, b_count * 2));
    QG_CUDA_CHECK(cudaMemset(scales_, 0, host_scales_.size() * sizeof(float)));
  } catch (const Error& e) {
    cudaFree(a_);
    cudaFree(b_);
    cudaFree(scales_);
    fail("GpuLoraStack for ", lora::target_module(target), " (", capacity, " adapters, rank ",
         rank_padded_, ", ", num_layers_, " layers): ", e.what());
  }
}

GpuLoraStack::~GpuLoraStack() {
  cudaFree(a_);
  cudaFree(b_);
  cudaFree(scales_);
}

void GpuLoraStack::load(int id, const lora::LoraAdapter& adapter) {
  const std::string what = "GpuLoraStack(" + std::string(lora::target_module(target_)) +
                           "): slot " + std::to_string(id);
  QG_CHECK(id >= 0 && id < capacity_, what, " is outside [0, ", capacity_, ")");
  QG_CHECK(adapter.rank() <= max_rank_, what, ": adapter rank ", adapter.rank(),
           " is above the stack's max_rank ", max_rank_);
  QG_CHECK(adapter.num_layers() == num_layers_ &&
               adapter.features(target_) == std::make_pair(in_, out_),
           what, ": the adapter was made for a model of a different shape");
  const std::int64_t r = adapter.rank(), rp = rank_padded_;
  std::vector<std::uint16_t> a(static_cast<std::size_t>(rp * in_));
  std::vector<std::uint16_t> b(static_cast<std::size_t>(out_ * rp));
  bool any = false;
  for (int layer = 0; layer < num_layers_; ++layer) {
    std::fill(a.begin(), a.end(), std::uint16_t{0});
    std::fill(b.begin(), b.end(), std::uint16_t{0});
    const lora::LoraFactors f = adapter.factors(layer, target_);
    if (f.rank > 0) {
      any = true;
      for (std::int64_t i = 0; i < r * in_; ++i) a[static_cast<std::size_t>(i)] = float_to_half(f.a[i]);
      for (std::int64_t o = 0; o < out_; ++o)
        for (std::int64_t k = 0; k < r; ++k)
          b[static_cast<std::size_t>(o * rp + k)] = float_to_half(f.b[o * r + k]);
    }
    const std::size_t slot = static_cast<std::size_t>(layer) * capacity_ + id;
    QG_CUDA_CHECK(cudaMemcpy(a_ + slot * a.size(), a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    QG_CUDA_CHECK(cudaMemcpy(b_ + slot * b.size(), b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  }
  host_scales_[static_cast<std::size_t>(id)] = any ? adapter.scale() : 0.0f;
  QG_CUDA_CHECK(cudaMemcpy(scales_ + id, &host_scales_[static_cast<std::size_t>(id)], sizeof(float),
                           cudaMemcpyHostToDevice));
}

void GpuLoraStack::unload(int id) {
  QG_CHECK(id >= 0 && id < capacity_, "GpuLoraStack: slot ", id, " is outside [0, ", capacity_,
           ")");
  host_scales_[static_cast<std::size_t>(id)] = 0.0f;
  QG_CUDA_CHECK(cudaMemcpy(scales_ + id, &host_scales_[static_cast<std::size_t>(id)], sizeof(float),
                           cudaMemcpyHostToDevice));
}

bool GpuLoraStack::loaded(int id) const {
  return id >= 0 && id < capacity_ && host_scales_[static_cast<std::size_t>(id)] != 0.0f;
}

LoraLayerView GpuLoraStack::layer(int layer) const {
  QG_CHECK(layer >= 0 && layer < num_layers_, "GpuLoraStack: layer ", layer, " outside [0, ",
           num_layers_, ")");
  const std::size_t slot = static_cast<std::size_t>(layer) * capacity_;
  LoraLayerView v;
  v.a = a_ + slot * rank_padded_ * in_;
  v.b = b_ + slot * rank_padded_ * out_;
  v.scales = scales_;
  v.capacity = capacity_;
  v.rank_padded = rank_padded_;
  v.in = in_;
  v.out = out_;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Entry points

std::size_t lora_add_workspace_bytes(const LoraLayerView& layer, std::int64_t tokens) {
  if (tokens <= 0) return 0;
  const ShrinkPlan plan = plan_shrink(layer.in, tokens);
  return static_cast<std::size_t>(plan.splits) * tokens * layer.rank_padded * sizeof(float);
}

void lora_add_f16(const LoraLayerView& layer, const std::uint16_t* x, std::uint16_t* y,
                  std::int64_t tokens, const std::int32_t* adapter_of_row, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream) {
  QG_CHECK(tokens >= 0, "lora_add_f16: negative token count ", tokens);
  if (tokens == 0) return;
  QG_CHECK(layer.a && layer.b && layer.scales, "lora_add_f16: empty layer view");
  QG_CHECK(x && y && adapter_of_row && workspace, "lora_add_f16: null pointer argument");
  QG_CHECK(layer.in % 8 == 0 && layer.out % 8 == 0, "lora_add_f16: in ", layer.in, " and out ",
           layer.out, " must be multiples of 8");
  QG_CHECK(reinterpret_cast<std::uintptr_t>(x) % 4 == 0 &&
               reinterpret_cast<std::uintptr_t>(y) % 4 == 0,
           "lora_add_f16: x and y must be 4-byte aligned");
  const std::size_t need = lora_add_workspace_bytes(layer, tokens);
  QG_CHECK(workspace_bytes >= need, "lora_add_f16: workspace of ", workspace_bytes,
           " bytes, need ", need, " for ", tokens, " tokens");
  const ShrinkPlan plan = plan_shrink(layer.in, tokens);
  const auto* xh = reinterpret_cast<const __half*>(x);
  auto* yh = reinterpret_cast<__half*>(y);
  auto* partial = static_cast<float*>(workspace);
  switch (layer.rank_padded) {
    case 16: launch<1>(layer, xh, yh, tokens, adapter_of_row, partial, plan, stream); break;
    case 32: launch<2>(layer, xh, yh, tokens, adapter_of_row, partial, plan, stream); break;
    case 48: launch<3>(layer, xh, yh, tokens, adapter_of_row, partial, plan, stream); break;
    case 64: launch<4>(layer, xh, yh, tokens, adapter_of_row, partial, plan, stream); break;
    default: fail("lora_add_f16: padded rank ", layer.rank_padded, " is not 16, 32, 48 or 64");
  }
}

void check_adapter_rows(const GpuLoraStack& stack, const std::vector<std::int32_t>& ids) {
  for (std::size_t t = 0; t < ids.size(); ++t) {
    QG_CHECK(ids[t] >= -1 && ids[t] < stack.capacity(), "LoRA: row ", t, " selects adapter ",
             ids[t], " but the ", lora::target_module(stack.target()), " stack has slots [0, ",
             stack.capacity(), ") (-1 for none)");
  }
}

}  // namespace qg::cuda
