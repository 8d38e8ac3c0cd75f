// Device primitives of the attention kernels (sm_80+): cp.async copies, the shared-memory
// swizzle for ldmatrix, fragment loads, the m16n8k16 fp16 mma, and the rotary table shared by
// the append kernel. Host helpers used by every attention launcher are declared at the end.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "qinggeng/cuda/attention.h"

namespace qg::cuda::attn {

// ---- asynchronous copies ----

/// 16-byte global->shared copy; with `valid` false the destination is zero-filled and nothing
/// is read (src must still be a mapped address: callers pass the buffer base).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
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

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const __half* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// As ldmatrix_x4 with each 8x8 matrix transposed (B operands stored k-major).
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const __half* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// c[16x8] += a[16x16] b[16x8], fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4],
                                          std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

}  // namespace qg::cuda::attn
