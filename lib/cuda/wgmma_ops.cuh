// Hopper (sm_90a) warpgroup MMA wrappers: wgmma.mma_async m64nNk16 with fp16 inputs from
// shared memory and fp32 accumulators in registers, plus its fence / commit / wait and the
// shared-memory matrix descriptor for K-major tiles stored with the 128-byte swizzle, and the
// mbarrier / named-barrier / TMA / setmaxnreg primitives of a warp-specialised Hopper pipeline.
// The instruction bodies exist only in the sm_90a pass of nvcc (__CUDA_ARCH_FEAT_SM90_ALL);
// other targets compile a trap, and the host side never launches them there.
#pragma once

#include <cstdint>

namespace qg::cuda::wgmma {

/// Descriptor of a K-major tile whose rows are 128 bytes (64 fp16), 8-row groups 1024 bytes
/// apart, stored with the 128-byte swizzle (16-byte chunk c of row r at c ^ (r % 8)); the
/// tile must start 1024-byte aligned. Stepping K by 16 inside the row adds 32 bytes.
__device__ __forceinline__ std::uint64_t smem_desc(const void* smem) {
  const auto addr = static_cast<std::uint64_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3ffff) >> 4)          // start address
         | (std::uint64_t{1} << 16)       // leading byte offset (unused with this swizzle)
         | (std::uint64_t{1024 >> 4} << 32)  // stride byte offset: next 8-row group
         | (std::uint64_t{1} << 62);      // 128-byte swizzle
}

__device__ __forceinline__ void fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/// Waits until at most kPending committed wgmma groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

/// Descriptor of an MN-major tile (kTransB operands): rows of 64 fp16 along N (128 bytes), one
/// row per k, 8-row groups 1024 bytes apart, stored with the 128-byte swizzle as a TMA box of
/// {64, k rows} lands; the next 64 columns of N start `column_block_bytes` later. Stepping K
/// by 16 adds 16 rows (2048 bytes).
__device__ __forceinline__ std::uint64_t smem_desc_mn(const void* smem,
                                                      unsigned column_block_bytes) {
  const auto addr = static_cast<std::uint64_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3ffff) >> 4)                                      // start address
         | (static_cast<std::uint64_t>((column_block_bytes >> 4) & 0x3fff) << 16)  // leading
         | (std::uint64_t{1024 >> 4} << 32)                            // stride: 8 k rows
         | (std::uint64_t{1} << 62);                                   // 128-byte swizzle
}

/// d[64 x 128] (+)= A[64 x 16] · B[128 x 16]^T, A K-major and B K-major (kTransB = 0) or
/// MN-major (kTransB = 1), in 128B-swizzled shared memory.
template <int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], std::uint64_t desc_a,
                                              std::uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, %67;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
        "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransB));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

/// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32): lets
/// some warpgroups of a CTA synchronise without the others.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- mbarriers and the tensor-memory-access (TMA) copy engine ----

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

/// Initialises a shared-memory barrier that completes a phase after `arrivals` arrivals
/// (plus, when armed with expect_tx, the announced bytes).
__device__ __forceinline__ void barrier_init(std::uint64_t* bar, unsigned arrivals) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
               : "memory");
#endif
}

/// Makes barrier initialisation visible to the copy engine (then __syncthreads).
__device__ __forceinline__ void barrier_init_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void barrier_arrive(std::uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

/// Arrives and announces `bytes` that copies completing on this barrier will deliver.
__device__ __forceinline__ void barrier_arrive_expect_bytes(std::uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}

/// Blocks until the barrier phase with this parity (0 for its 1st, 3rd, ... completion) ended.
__device__ __forceinline__ void barrier_wait(std::uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

/// TMA: copies the box at (inner, outer) of the tensor `map` describes into shared memory,
/// completing `bytes` on `bar`. Out-of-range elements arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int inner, int outer,
                                            std::uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer)
      : "memory");
#endif
}

/// Starts fetching a TMA descriptor (a __grid_constant__ kernel parameter) into the copy
/// engine's cache, so the first copy does not wait for it.
__device__ __forceinline__ void tma_prefetch_descriptor(const void* map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map))
               : "memory");
#endif
}

/// Starts fetching the 2-D box at (inner, outer) of the tensor `map` describes into L2 only
/// (no shared memory, no barrier): safe before a chained launch's wait (chained_launch.cuh).
__device__ __forceinline__ void tma_prefetch_l2_2d(const void* map, int inner, int outer) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];\n" ::"l"(
                   reinterpret_cast<std::uint64_t>(map)),
               "r"(inner), "r"(outer)
               : "memory");
#endif
}

/// Hands registers between warpgroups: producers shrink to kRegs, consumers grow to kRegs.
template <int kRegs>
__device__ __forceinline__ void shrink_registers() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void grow_registers() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

}  // namespace qg::cuda::wgmma
