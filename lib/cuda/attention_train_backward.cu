// FlashAttention-2 style backward of the training attention (include/qinggeng/cuda/
// attention_train.h), GLM mask, packed sequences, fp16 in and out, fp32 inside.
//
//   1. prepare:  D[t, h] = dout[t, h] . out[t, h]; the fp32 dq accumulators are zeroed.
//   2. main:     one CTA per (64-key block, head, sequence), 4 warps of 16 keys. K and V stay
//                in shared memory; the query blocks that can see any of the keys (all of them
//                when the block starts inside the GLM prefix, else those from the block on)
//                stream through in 32-row tiles with their dout, lse and D. Per tile, each
//                warp recomputes P^T = exp(K Q^T * scale - lse) for its keys, then
//                dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - D),  dK += dS^T Q
//                in registers; dS goes through shared memory so that the four warps form
//                dQ += dS K for the tile, added into the fp32 accumulators with atomics.
//   3. finish:   dq = accumulators * scale into the q slices of dqkv (dK and dV were written
//                by step 2 straight into the k and v slices).
// Fragment layouts follow the forward kernel (attention_prefill.cu): mma.sync m16n8k16 with
// operands from swizzled shared tiles via ldmatrix (.trans for operands stored k-major).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/attention_tiles.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kKeys = 64;     // keys per CTA (16 per warp)
constexpr int kQueries = 32;  // queries per streamed tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int backward_smem_bytes() {
  return (2 * kKeys * D + 2 * kQueries * D + kQueries * kKeys) * 2 + 2 * kQueries * 4;
}

std::size_t align256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- CUDA kernels ----

/// D[t, h] = sum_d dout[t, h, d] out[t, h, d] (one warp per (row, head)); zeroes dq_acc.
__global__ void prepare_kernel(const __half* out, const __half* dout, int total, int heads,
                               int head_dim, float* dvec, float* dq_acc) {
  const std::int64_t pair = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) +
                            threadIdx.x / 32;
  if (pair >= static_cast<std::int64_t>(total) * heads) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t base = pair * head_dim;  // [T, heads, D] == [T * heads, D]
  float acc = 0.0f;
  for (int d = lane; d < head_dim; d += 32) {
    acc += __half2float(dout[base + d]) * __half2float(out[base + d]);
    dq_acc[base + d] = 0.0f;
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dvec[pair] = acc;
}

/// dq slice of dqkv = dq_acc * scale.
__global__ void finish_kernel(const float* dq_acc, int total, int heads, int head_dim,
                              float scale, __half* dqkv) {
  const std::int64_t count = static_cast<std::int64_t>(total) * heads * head_dim;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       i < count; i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / (heads * head_dim), rest = i % (heads * head_dim);
    const std::int64_t h = rest / head_dim, d = rest % head_dim;
    dqkv[row * 3 * heads * head_dim + h * 3 * head_dim + d] = __float2half_rn(dq_acc[i] * scale);
  }
}

/// Loads `rows` rows of `head_dim` halves (row r at base + (first + r) * stride) into a
/// swizzled tile; rows at or past `limit` are zero-filled.
template <int D, int kRows>
__device__ void load_rows(__half* tile, const __half* base, std::int64_t stride, int first,
                          int limit) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = first + row < limit;
    const __half* from = valid ? base + static_cast<std::int64_t>(first + row) * stride + chunk * 8
                               : base;
    attn::cp_async_16(tile + attn::tile_offset<D>(row, chunk), from, valid);
  }
}

/// A-operand fragments (16 rows x 16 columns at column step kk) of a row-major tile.
template <int kDim>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const __half* tile, int row0,
                                       int kk, int lane) {
  const int row = row0 + (lane % 8) + ((lane / 8) % 2) * 8;
  attn::ldmatrix_x4(a, tile + attn::tile_offset<kDim>(row, kk * 2 + lane / 16));
}

/// B-operand fragments of two n-frags (columns n0..n0+15 of B = tile^T, k step kk) when the
/// tile stores B's columns as rows (n-major, k contiguous): non-transposed ldmatrix.
template <int kDim>
__device__ __forceinline__ void load_b_rows(std::uint32_t (&b)[4], const __half* tile, int n0,
                                            int kk, int lane) {
  const int row = n0 + (lane % 8) + (lane / 16) * 8;
  attn::ldmatrix_x4(b, tile + attn::tile_offset<kDim>(row, kk * 2 + (lane / 8) % 2));
}

/// B-operand fragments of two n-frags (columns 16*np..+15) at k step kk when the tile stores
/// B k-major (rows = k): transposed ldmatrix.
template <int kDim>
__device__ __forceinline__ void load_b_kmajor(std::uint32_t (&b)[4], const __half* tile,
                                              int chunk0, int kk, int lane) {
  const int row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
  attn::ldmatrix_x4_trans(b, tile + attn::tile_offset<kDim>(row, chunk0 + lane / 16));
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(TrainAttentionBatch b, const __half* qkv, const __half* dout,
                    const float* lse, const float* dvec, int heads, float scale_log2,
                    float scale, float* dq_acc, __half* dqkv) {
  constexpr int kDimSteps = D / 16, kDFrags = D / 8, kQFrags = kQueries / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* sK = reinterpret_cast<__half*>(smem_raw);
  __half* sV = sK + kKeys * D;
  __half* sQ = sV + kKeys * D;
  __half* sO = sQ + kQueries * D;  // dout tile
  __half* sS = sO + kQueries * D;  // dS [query][key]
  float* sLse = reinterpret_cast<float*>(sS + kQueries * kKeys);
  float* sD = sLse + kQueries;

  const int seq = blockIdx.z, head = blockIdx.y, j0 = blockIdx.x * kKeys;
  const int r0 = b.row_start[seq], n = b.row_start[seq + 1] - r0, ctx = b.context_length[seq];
  if (j0 >= n) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t row_stride = 3LL * heads * D, out_stride = static_cast<std::int64_t>(heads) * D;
  const __half* q_base = qkv + static_cast<std::int64_t>(r0) * row_stride + head * 3 * D;
  const __half* k_base = q_base + D;
  const __half* v_base = q_base + 2 * D;
  const __half* o_base = dout + static_cast<std::int64_t>(r0) * out_stride + head * D;

  load_rows<D, kKeys>(sK, k_base, row_stride, j0, n);
  load_rows<D, kKeys>(sV, v_base, row_stride, j0, n);
  attn::cp_async_commit();

  float dk[kDFrags][4], dv[kDFrags][4];
#pragma unroll
  for (int j = 0; j < kDFrags; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.0f;
  }
  const int kb = warp * 16;  // this warp's keys within the block
  // Queries that see any key of the block: every query if the block starts in the prefix,
  // else the causal ones from j0 on.
  const int q_first = j0 < ctx ? 0 : (j0 / kQueries) * kQueries;

  for (int q0 = q_first; q0 < n; q0 += kQueries) {
    load_rows<D, kQueries>(sQ, q_base, row_stride, q0, n);
    load_rows<D, kQueries>(sO, o_base, out_stride, q0, n);
    attn::cp_async_commit();
    if (threadIdx.x < kQueries) {
      const int q = q0 + threadIdx.x;
      const std::int64_t at = static_cast<std::int64_t>(r0 + q) * heads + head;
      sLse[threadIdx.x] = q < n ? lse[at] * kLog2e : INFINITY;
      sD[threadIdx.x] = q < n ? dvec[at] : 0.0f;
    }
    attn::cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T for this warp's 16 keys x 32 queries, then P^T.
    float p[kQFrags][4];
#pragma unroll
    for (int j = 0; j < kQFrags; ++j) p[j][0] = p[j][1] = p[j][2] = p[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      std::uint32_t a[4];
      load_a<D>(a, sK, kb, kk, lane);
#pragma unroll
      for (int np = 0; np < kQFrags / 2; ++np) {
        std::uint32_t bq[4];
        load_b_rows<D>(bq, sQ, np * 16, kk, lane);
        attn::mma_16816(p[2 * np], a, bq[0], bq[1]);
        attn::mma_16816(p[2 * np + 1], a, bq[2], bq[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j0 + kb + g + 8 * (e / 2), ql = j * 8 + 2 * t + (e & 1), q = q0 + ql;
        const bool visible = key < n && q < n && (key < ctx || key <= q);
        p[j][e] = visible ? exp2f(p[j][e] * scale_log2 - sLse[ql]) : 0.0f;
      }
    }

    // dV += P^T dO  (k = queries).
#pragma unroll
    for (int kk = 0; kk < kQueries / 16; ++kk) {
      const std::uint32_t pa[4] = {attn::pack_half2(p[2 * kk][0], p[2 * kk][1]),
                                   attn::pack_half2(p[2 * kk][2], p[2 * kk][3]),
                                   attn::pack_half2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                   attn::pack_half2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t bo[4];
        load_b_kmajor<D>(bo, sO, dp * 2, kk, lane);
        attn::mma_16816(dv[2 * dp], pa, bo[0], bo[1]);
        attn::mma_16816(dv[2 * dp + 1], pa, bo[2], bo[3]);
      }
    }

    // dP^T = V dO^T, then dS^T = P^T (dP^T - D).
    float ds[kQFrags][4];
#pragma unroll
    for (int j = 0; j < kQFrags; ++j) ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      std::uint32_t a[4];
      load_a<D>(a, sV, kb, kk, lane);
#pragma unroll
      for (int np = 0; np < kQFrags / 2; ++np) {
        std::uint32_t bo[4];
        load_b_rows<D>(bo, sO, np * 16, kk, lane);
        attn::mma_16816(ds[2 * np], a, bo[0], bo[1]);
        attn::mma_16816(ds[2 * np + 1], a, bo[2], bo[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = j * 8 + 2 * t + (e & 1);
        ds[j][e] = p[j][e] * (ds[j][e] - sD[ql]);
      }
    }

    // dK += dS^T Q  (k = queries); dS also goes to shared memory as [query][key] for dQ.
#pragma unroll
    for (int kk = 0; kk < kQueries / 16; ++kk) {
      const std::uint32_t sa[4] = {attn::pack_half2(ds[2 * kk][0], ds[2 * kk][1]),
                                   attn::pack_half2(ds[2 * kk][2], ds[2 * kk][3]),
                                   attn::pack_half2(ds[2 * kk + 1][0], ds[2 * kk + 1][1]),
                                   attn::pack_half2(ds[2 * kk + 1][2], ds[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t bq[4];
        load_b_kmajor<D>(bq, sQ, dp * 2, kk, lane);
        attn::mma_16816(dk[2 * dp], sa, bq[0], bq[1]);
        attn::mma_16816(dk[2 * dp + 1], sa, bq[2], bq[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kQFrags; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kb + g + 8 * (e / 2), ql = j * 8 + 2 * t + (e & 1);
        sS[attn::tile_offset<kKeys>(ql, key / 8) + key % 8] = __float2half_rn(ds[j][e]);
      }
    }
    __syncthreads();

    // dQ (32 queries x D) += dS K: warp = (16-query half, D/2-column half).
    {
      constexpr int kCols = D / 2, kColFrags = kCols / 8;
      const int qr = (warp % 2) * 16, dc = (warp / 2) * kCols;
      float acc[kColFrags][4];
#pragma unroll
      for (int j = 0; j < kColFrags; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        std::uint32_t a[4];
        load_a<kKeys>(a, sS, qr, kk, lane);
#pragma unroll
        for (int dp = 0; dp < kCols / 16; ++dp) {
          std::uint32_t bk[4];
          load_b_kmajor<D>(bk, sK, dc / 8 + dp * 2, kk, lane);
          attn::mma_16816(acc[2 * dp], a, bk[0], bk[1]);
          attn::mma_16816(acc[2 * dp + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < kColFrags; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = q0 + qr + g + 8 * (e / 2), d = dc + j * 8 + 2 * t + (e & 1);
          if (q < n) {
            atomicAdd(dq_acc + static_cast<std::int64_t>(r0 + q) * out_stride + head * D + d,
                      acc[j][e]);
          }
        }
      }
    }
    __syncthreads();  // sQ, sO and sS are refilled by the next tile
  }

  // dK (times the softmax scale) and dV of this warp's keys into the k and v slices.
#pragma unroll
  for (int j = 0; j < kDFrags; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = j0 + kb + g + 8 * h;
      if (key >= n) continue;
      __half* row = dqkv + static_cast<std::int64_t>(r0 + key) * row_stride + head * 3 * D +
                    j * 8 + 2 * t;
      *reinterpret_cast<__half2*>(row + D) =
          __floats2half2_rn(dk[j][2 * h] * scale, dk[j][2 * h + 1] * scale);
      *reinterpret_cast<__half2*>(row + 2 * D) = __floats2half2_rn(dv[j][2 * h], dv[j][2 * h + 1]);
    }
  }
}

template <int D>
void launch_backward(const TrainAttentionBatch& b, const __half* qkv, const __half* dout,
                     const float* lse, const float* dvec, int heads, float* dq_acc,
                     __half* dqkv, cudaStream_t stream) {
  constexpr int smem = backward_smem_bytes<D>();
  opt_in_shared_memory(reinterpret_cast<const void*>(backward_kernel<D>), smem);
  const dim3 grid((b.max_seq_len + kKeys - 1) / kKeys, heads, b.num_seqs);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  backward_kernel<D><<<grid, kThreads, smem, stream>>>(b, qkv, dout, lse, dvec, heads,
                                                       scale * kLog2e, scale, dq_acc, dqkv);
  QG_CUDA_CHECK(cudaGetLastError());
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
  QG_CHECK(b.num_seqs <= 65535 && heads <= 65535, what, ": ", b.num_seqs, " sequences x ",
           heads, " heads exceed one launch grid");
}

}  // namespace attn

// ---- host entry points ----

std::size_t attention_train_backward_workspace_bytes(int total_tokens, int heads, int head_dim) {
  const std::size_t rows = static_cast<std::size_t>(total_tokens) * heads;
  return align256(rows * head_dim * sizeof(float)) + align256(rows * sizeof(float));
}

void attention_train_backward(const __half* qkv, const __half* out, const float* lse,
                              const __half* dout, const TrainAttentionBatch& batch, int heads,
                              int head_dim, __half* dqkv, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream) {
  attn::check_train_attention_args(batch, heads, head_dim, "attention_train_backward");
  QG_CHECK(head_dim >= 32, "attention_train_backward: head_dim ", head_dim,
           " is not supported (32, 64 or 128)");
  QG_CHECK(qkv && out && lse && dout && dqkv && workspace,
           "attention_train_backward: null pointer");
  const std::size_t need =
      attention_train_backward_workspace_bytes(batch.total_tokens, heads, head_dim);
  QG_CHECK(workspace_bytes >= need, "attention_train_backward: workspace of ", workspace_bytes,
           " bytes, need ", need);
  const std::size_t rows = static_cast<std::size_t>(batch.total_tokens) * heads;
  float* dq_acc = static_cast<float*>(workspace);
  float* dvec = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                         align256(rows * head_dim * sizeof(float)));
  prepare_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      out, dout, batch.total_tokens, heads, head_dim, dvec, dq_acc);
  QG_CUDA_CHECK(cudaGetLastError());
  switch (head_dim) {
    case 32: launch_backward<32>(batch, qkv, dout, lse, dvec, heads, dq_acc, dqkv, stream); break;
    case 64: launch_backward<64>(batch, qkv, dout, lse, dvec, heads, dq_acc, dqkv, stream); break;
    default: launch_backward<128>(batch, qkv, dout, lse, dvec, heads, dq_acc, dqkv, stream); break;
  }
  const std::int64_t count = static_cast<std::int64_t>(rows) * head_dim;
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((count + 255) / 256, 8192));
  finish_kernel<<<blocks, 256, 0, stream>>>(dq_acc, batch.total_tokens, heads, head_dim,
                                            1.0f / sqrtf(static_cast<float>(head_dim)), dqkv);
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
