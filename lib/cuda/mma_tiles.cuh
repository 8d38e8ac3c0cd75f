// Tensor-core tile primitives shared by the CUDA matrix kernels: asynchronous global->shared
// copies, a bank-conflict-free shared-memory swizzle for ldmatrix, fragment loads, the
// m16n8k16 fp16 mma, and the fused GEMM epilogue (bias, gelu, residual, fp16/fp32 store).
// Everything here runs on sm_80 and newer (mma.sync / ldmatrix / cp.async).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/gelu.cuh"

namespace qg::cuda::tiles {

// ---- asynchronous copies ----

/// 16-byte global->shared copy; when `valid` is false the destination is zero-filled and
/// nothing is read (src must still be a mapped address, callers pass the tensor base).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

/// 4-byte global->shared copy (both addresses 4-byte aligned); zero-fills without reading when
/// `valid` is false, as cp_async_16.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

/// Waits until at most `kPending` committed copy groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

/// The multi-stage main loop of the block-tiled kernels: K slices [0, k_tiles) go through
/// `Stages` rotating shared-memory slots, load_stage(slot, kt) issuing the cp.async copies of
/// slice kt while compute(slot) runs on the slice loaded Stages - 1 iterations earlier.
/// prepare() runs once, after the first copies are issued and before the first compute (set-up
/// that overlaps them; it must end with a block barrier if compute reads what it writes).
template <int Stages, class Load, class Compute, class Prepare>
__device__ __forceinline__ void pipelined_k_loop(int k_tiles, Load&& load_stage, Compute&& compute,
                                                 Prepare&& prepare) {
#pragma unroll
  for (int s = 0; s < Stages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  prepare();
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Stages - 2>();
    // Slice kt has landed for every thread, and every warp is done with slice kt - 1, whose
    // slot the copy below overwrites.
    __syncthreads();
    const int next = kt + Stages - 1;
    if (next < k_tiles) load_stage(next % Stages, next);
    cp_async_commit();
    compute(kt % Stages);
  }
  cp_async_wait<0>();
}

template <int Stages, class Load, class Compute>
__device__ __forceinline__ void pipelined_k_loop(int k_tiles, Load&& load_stage,
                                                 Compute&& compute) {
  pipelined_k_loop<Stages>(k_tiles, load_stage, compute, [] {});
}

// ---- shared-memory layout ----

/// Physical 16-byte chunk of logical chunk `chunk` in row `row` of a tile whose rows are
/// kRowHalves fp16 wide. XOR-swizzling by the row's position within a 128-byte bank line makes
/// the 8 row addresses of every ldmatrix phase hit 8 different 16-byte bank groups.
template <int kRowHalves>
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) {
  constexpr int kChunks = kRowHalves / 8;       // 16-byte chunks per row
  constexpr int kRowsPerLine = 8 / kChunks;     // rows sharing one 128-byte line
  static_assert(kChunks == 4 || kChunks == 8, "tile rows must be 32 or 64 halves");
  return chunk ^ ((row / kRowsPerLine) % kChunks);
}

// ---- tile copies ----

/// Copies rows [r0, r0 + Rows) x columns [c0, c0 + Width) of a row-major [rows_total, cols]
/// fp16 matrix into a [Rows][Width] shared tile, 16-byte chunk `chunk` of tile row `row` at
/// chunk swizzle(row, chunk); rows >= rows_total and columns >= cols are zero-filled (cols and
/// c0 multiples of 8).
template <int Rows, int Width, int Threads, class Swizzle>
__device__ __forceinline__ void copy_rows_to_tile(__half* tile, const __half* src, std::int64_t r0,
                                                  std::int64_t rows_total, std::int64_t c0,
                                                  std::int64_t cols, Swizzle&& swizzle) {
  constexpr int kChunks = Width / 8;
  static_assert((Rows * kChunks) % Threads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < Rows * kChunks / Threads; ++it) {
    const int c = it * Threads + static_cast<int>(threadIdx.x);
    const int row = c / kChunks, chunk = c % kChunks;
    const std::int64_t gr = r0 + row, gc = c0 + chunk * 8;
    const bool valid = gr < rows_total && gc < cols;
    cp_async_16(tile + row * Width + swizzle(row, chunk) * 8, valid ? src + gr * cols + gc : src,
                valid);
  }
}

/// Copies rows [r0, r0 + Rows) x halves [k0, k0 + BK) of a row-major [rows, K] matrix into a
/// swizzled shared tile; rows >= rows_total and k >= K are zero-filled.
template <int Rows, int BK, int Threads>
__device__ __forceinline__ void copy_tile(__half* tile, const __half* src, std::int64_t r0,
                                          std::int64_t rows_total, std::int64_t k0,
                                          std::int64_t K) {
  copy_rows_to_tile<Rows, BK, Threads>(tile, src, r0, rows_total, k0, K, [](int row, int chunk) {
    return swizzle_chunk<BK>(row, chunk);
  });
}

// ---- shared-memory tiles stored MN-major: [BK rows (k)][kWidth halves] ----

/// Physical chunk of logical 16-byte chunk `chunk` in row `row` of an MN-major tile whose rows
/// are a multiple of 8 chunks: XOR with the row's low 3 bits, so the 8 consecutive k rows an
/// ldmatrix phase addresses at one logical chunk hit 8 different bank groups.
__device__ __forceinline__ int mn_swizzle(int row, int chunk) { return chunk ^ (row & 7); }

/// Copies k rows [k0, k0 + BK) x columns [c0, c0 + kWidth) of a row-major [K, cols] matrix
/// into an MN-major tile; rows >= K and columns >= cols (cols % 8 == 0) are zero-filled.
template <int kWidth, int BK, int Threads>
__device__ __forceinline__ void copy_mn_tile(__half* tile, const __half* src, std::int64_t k0,
                                             std::int64_t K, std::int64_t c0, std::int64_t cols) {
  copy_rows_to_tile<BK, kWidth, Threads>(tile, src, k0, K, c0, cols,
                                         [](int row, int chunk) { return mn_swizzle(row, chunk); });
}

/// Address in an MN-major [BK][kWidth] tile of element (k, col), col a multiple of 8 (Half:
/// __half or const __half).
template <int kWidth, class Half>
__device__ __forceinline__ Half* mn_at(Half* tile, int k, int col) {
  return tile + k * kWidth + mn_swizzle(k, col / 8) * 8;
}

// ---- fragments and mma ----

/// Four 8x8 fp16 matrices from shared memory; lane l supplies the row address of matrix l/8.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// The A fragment (16 rows from row0, k 16 kk .. + 15) of a swizzled K-major tile whose rows
/// are BK halves wide (copy_tile's layout).
template <int BK>
__device__ __forceinline__ void load_a_fragment(std::uint32_t (&a)[4], const __half* tile, int row0,
                                                int kk, int lane) {
  const int row = row0 + (lane % 16);
  const int chunk = kk * 2 + lane / 16;
  ldmatrix_x4(a, tile + row * BK + swizzle_chunk<BK>(row, chunk) * 8);
}

/// c[16x8] += a[16x16] · b[16x8] (fp16 in, fp32 accumulate), register fragments as in the PTX
/// ISA: a = {rows 0-7 k 0-7, rows 8-15 k 0-7, rows 0-7 k 8-15, rows 8-15 k 8-15}.
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4],
                                          std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// As ldmatrix_x4 with each 8x8 matrix transposed (operands stored k-major: row = k).
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// Sets a warp's MFrags x NFrags m16n8 accumulators to zero.
template <int MFrags, int NFrags>
__device__ __forceinline__ void zero_warp_tile(float (&acc)[MFrags][NFrags][4]) {
#pragma unroll
  for (int i = 0; i < MFrags; ++i)
#pragma unroll
    for (int j = 0; j < NFrags; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
}

/// acc[i][j] += a[i] · b[j] over a warp's MFrags x NFrags m16n8 fragments.
template <int MFrags, int NFrags>
__device__ __forceinline__ void mma_warp_tile(float (&acc)[MFrags][NFrags][4],
                                              const std::uint32_t (&a)[MFrags][4],
                                              const std::uint32_t (&b)[NFrags][2]) {
#pragma unroll
  for (int i = 0; i < MFrags; ++i)
#pragma unroll
    for (int j = 0; j < NFrags; ++j) mma_16816(acc[i][j], a[i], b[j][0], b[j][1]);
}

/// Stores an ldmatrix x4 result holding two n8 B fragments as b[2 * pair] and b[2 * pair + 1].
template <int NFrags>
__device__ __forceinline__ void set_b_pair(std::uint32_t (&b)[NFrags][2], int pair,
                                           const std::uint32_t (&r)[4]) {
  b[2 * pair][0] = r[0];
  b[2 * pair][1] = r[1];
  b[2 * pair + 1][0] = r[2];
  b[2 * pair + 1][1] = r[3];
}

/// Where this thread works in a block-tiled mma.sync kernel of tile shape S (BM x BN, warps in
/// a WarpsM x WarpsN grid): the CTA tile's first row and column (grid x: M tiles, y: N tiles),
/// the lane, and the warp's row and column in the grid.
struct CtaPlace {
  std::int64_t m0, n0;
  int lane, wm, wn;
};

template <class S>
__device__ __forceinline__ CtaPlace cta_place() {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  return {static_cast<std::int64_t>(blockIdx.x) * S::BM,
          static_cast<std::int64_t>(blockIdx.y) * S::BN, static_cast<int>(threadIdx.x) % 32,
          warp / S::WarpsN, warp % S::WarpsN};
}

/// Calls store(row, col, v0, v1) for every accumulator pair of a warp tile whose first row and
/// column are row0, col0 (the m16n8 accumulator layout: rows lane / 4 and + 8, columns pairs).
template <int MFrags, int NFrags, class Store>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[MFrags][NFrags][4],
                                                std::int64_t row0, std::int64_t col0, int lane,
                                                Store&& store) {
#pragma unroll
  for (int i = 0; i < MFrags; ++i) {
#pragma unroll
    for (int j = 0; j < NFrags; ++j) {
      const std::int64_t row = row0 + i * 16 + lane / 4;
      const std::int64_t col = col0 + j * 8 + (lane % 4) * 2;
      store(row, col, acc[i][j][0], acc[i][j][1]);
      store(row + 8, col, acc[i][j][2], acc[i][j][3]);
    }
  }
}

// ---- epilogue ----

/// Device-side form of qg::cuda::GemmEpilogue plus the output it writes.
struct Epilogue {
  int kind = 0;  // 0 none, 1 bias, 2 bias+gelu, 3 bias+residual (GemmEpilogue::Kind order),
                 // 4 residual without bias (the backward's y = residual * alpha + acc)
  const __half* bias = nullptr;
  const __half* residual = nullptr;
  float alpha = 1.0f;
  void* y = nullptr;
  bool y_fp32 = false;
  std::int64_t M = 0, N = 0;
  // GemmLowRank: acc += U V^T over lr_rank more K columns (tile kernels only; 0: none).
  const __half* lr_u = nullptr;
  const __half* lr_v = nullptr;
  std::int64_t lr_rank = 0;
};

__device__ __forceinline__ float apply_epilogue(const Epilogue& e, std::int64_t row,
                                                std::int64_t col, float acc) {
  if (e.kind == 0) return acc;
  if (e.kind == 4) return __half2float(e.residual[row * e.N + col]) * e.alpha + acc;
  float v = acc + __half2float(e.bias[col]);
  if (e.kind == 2) v = gelu_tanh(v);
  if (e.kind == 3) v = __half2float(e.residual[row * e.N + col]) * e.alpha + v;
  return v;
}

/// Applies the epilogue to acc[row, col] and acc[row, col + 1] and stores what is in bounds.
/// Pairs are stored as one 4-byte (fp16) or 8-byte (fp32) access when N is even.
__device__ __forceinline__ void store_pair(const Epilogue& e, std::int64_t row, std::int64_t col,
                                           float v0, float v1) {
  if (row >= e.M || col >= e.N) return;
  v0 = apply_epilogue(e, row, col, v0);
  const bool second = col + 1 < e.N;
  if (second) v1 = apply_epilogue(e, row, col + 1, v1);
  const std::int64_t at = row * e.N + col;
  if (e.y_fp32) {
    float* out = static_cast<float*>(e.y) + at;
    if (second && (e.N % 2 == 0)) {
      *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
    } else {
      out[0] = v0;
      if (second) out[1] = v1;
    }
  } else {
    __half* out = static_cast<__half*>(e.y) + at;
    if (second && (e.N % 2 == 0)) {
      *reinterpret_cast<__half2*>(out) = __floats2half2_rn(v0, v1);
    } else {
      out[0] = __float2half_rn(v0);
      if (second) out[1] = __float2half_rn(v1);
    }
  }
}

/// Whether store_row8 may use 16-byte accesses: N % 8 == 0 and y, the bias and the residual
/// 16-byte aligned (then every 8-column group starting at a multiple of 8 is).
__device__ __forceinline__ bool row8_vectors_ok(const Epilogue& e) {
  const auto misaligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16; };
  return e.N % 8 == 0 && !misaligned(e.y) && !misaligned(e.bias) && !misaligned(e.residual);
}

/// Eight fp16 values (16 bytes, raw, by value: a reference would let the compiler read them as
/// four 4-byte loads) as floats.
__device__ __forceinline__ void unpack_half8(const uint4 raw, float (&out)[8]) {
  const auto* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

/// Eight fp16 values at a 16-byte aligned address, as floats.
__device__ __forceinline__ void load_half8(const __half* p, float (&out)[8]) {
  unpack_half8(*reinterpret_cast<const uint4*>(p), out);
}

/// Whether store_row8 takes its 16-byte path for acc[row, col .. col + 7].
__device__ __forceinline__ bool row8_vector_path(const Epilogue& e, std::int64_t row,
                                                 std::int64_t col, bool vectors) {
  return vectors && row < e.M && col + 8 <= e.N;
}

/// Applies the epilogue to acc[row, col .. col + 7] (v) and stores what is in bounds: with
/// 16-byte loads of the bias, the residual given (`residual8`: its 16 bytes at row * N + col,
/// loaded ahead by the caller; read only with a residual epilogue) and 16-byte stores when
/// `vectors` (row8_vectors_ok) and col % 8 == 0 and all 8 columns are inside N, else pair by
/// pair through store_pair. Epilogues that stage a tile in shared memory store it with this, a
/// warp covering whole rows.
__device__ __forceinline__ void store_row8(const Epilogue& e, std::int64_t row, std::int64_t col,
                                           float (&v)[8], bool vectors, const uint4& residual8) {
  if (row >= e.M || col >= e.N) return;
  if (!row8_vector_path(e, row, col, vectors)) {
#pragma unroll
    for (int i = 0; i < 8; i += 2) store_pair(e, row, col + i, v[i], v[i + 1]);
    return;
  }
  const std::int64_t at = row * e.N + col;
  float add[8];
  if (e.kind != 0 && e.kind != 4) {  // bias (+ gelu)
    load_half8(e.bias + col, add);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += add[i];
    if (e.kind == 2) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = gelu_tanh(v[i]);
    }
  }
  if (e.kind >= 3) {  // + residual * alpha
    unpack_half8(residual8, add);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = add[i] * e.alpha + v[i];
  }
  if (e.y_fp32) {
    auto* out = reinterpret_cast<float4*>(static_cast<float*>(e.y) + at);
    out[0] = make_float4(v[0], v[1], v[2], v[3]);
    out[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 packed;
    auto* h = reinterpret_cast<__half2*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(static_cast<__half*>(e.y) + at) = packed;
  }
}

}  // namespace qg::cuda::tiles
