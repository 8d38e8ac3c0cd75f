// Device primitives of the attention kernels (sm_80+) beyond the shared ones of mma_tiles.cuh:
// the shared-memory swizzle of their K/V tiles, the transposed fragment load, half2 packing.
// Host helpers used by every attention launcher are declared at the end.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/mma_tiles.cuh"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/cuda/attention_train.h"

namespace qg::cuda::attn {

// The generic tensor-core primitives (cp.async, ldmatrix, mma) are the GEMM kernels' ones.
using tiles::cp_async_16;
using tiles::cp_async_commit;
using tiles::cp_async_wait;
using tiles::ldmatrix_x4;
using tiles::ldmatrix_x4_trans;
using tiles::mma_16816;

/// acc[2 p] and acc[2 p + 1], two adjacent n8 blocks, += a times the 16-column B tile one x4
/// fragment load gave (b[0], b[1]: columns 0-7; b[2], b[3]: columns 8-15).
template <int kBlocks>
__device__ __forceinline__ void mma_16816_pair(float (&acc)[kBlocks][4], int p,
                                               const std::uint32_t (&a)[4],
                                               const std::uint32_t (&b)[4]) {
  mma_16816(acc[2 * p], a, b[0], b[1]);
  mma_16816(acc[2 * p + 1], a, b[2], b[3]);
}

// ---- shared-memory tiles ----

/// Physical 16-byte chunk of logical chunk `chunk` in row `row` of a tile with kChunks chunks
/// per row: XOR by the row's place among the rows sharing a 128-byte bank line, so the eight
/// row addresses of one ldmatrix phase fall in eight different bank groups.
template <int kChunks>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  if constexpr (kChunks >= 8) {
    return chunk ^ (row & 7);
  } else {
    return chunk ^ ((row / (8 / kChunks)) % kChunks);
  }
}

/// Element offset of (row, 16-byte chunk) in a swizzled tile of kDim fp16 per row.
template <int kDim>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * kDim + swizzle<kDim / 8>(row, chunk) * 8;
}

// ---- fragments and mma ----


__device__ __forceinline__ std::uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

// ---- host helpers shared by the launchers ----

/// log2(e) / sqrt(head_dim): scores are kept in the log2 domain so softmax uses exp2f.
float softmax_scale_log2(int head_dim);

/// Throws qg::Error unless head_dim is a compiled tile width and `kv` matches the batch.
void check_attention_args(const AttentionBatch& batch, const PagedKvLayer& kv, const void* out,
                          const char* what);

/// Throws qg::Error unless head_dim is a compiled tile width and the packed training batch is
/// well-formed (attention_train.h).
void check_train_attention_args(const TrainAttentionBatch& batch, int heads, int head_dim,
                                const char* what);

}  // namespace qg::cuda::attn
