// Hopper GEMM: the tiled pipeline of gemm_tiled.cu with the matrix work moved to wgmma
// (sm_90a), which runs about twice the tensor-core rate of mma.sync on H100/H200. Each CTA
// is two warpgroups computing a 128 x BN tile; all 256 threads stream 64-wide K slices of X
// and W into 128-byte-swizzled shared memory with cp.async (the layout wgmma reads through
// its descriptors), and each warpgroup keeps one wgmma batch in flight while the next slice
// is published. Built for sm_90a only (lib/CMakeLists.txt adds that target to this file);
// append_wgmma_tiles offers these shapes only after a probe saw the sm_90a code run.
#include <cstdint>
#include <vector>

#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/wgmma_ops.cuh"

namespace qg::cuda {
namespace {

using tiles::Epilogue;

template <int kBN, int kStages>
struct WgmmaShape {
  static constexpr int BM = 128, BN = kBN, BK = 64, Stages = kStages, Threads = 256;
  static constexpr int StageHalves = (BM + BN) * BK;
  static constexpr int SmemBytes = Stages * StageHalves * 2 + 1024;  // + base alignment slack
  static_assert(Stages >= 3, "one slot computes, one drains, the rest load");
};

// ---- CUDA kernels ----

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_tile(float (&acc)[64], std::uint64_t a, std::uint64_t b) {
  wgmma::wgmma_m64n128k16(acc, a, b, 1);
}
__device__ __forceinline__ void wgmma_tile(float (&acc)[128], std::uint64_t a, std::uint64_t b) {
  wgmma::wgmma_m64n256k16(acc, a, b, 1);
}
#endif

template <class S>
__global__ void __launch_bounds__(S::Threads, 1)
    gemm_wgmma_kernel(const __half* __restrict__ x, const __half* __restrict__ w, Epilogue e,
                      std::int64_t K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes and wgmma assumes tiles start on it.
  auto* smem = reinterpret_cast<__half*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) &
                                         ~std::uintptr_t{1023});
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * S::BM;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * S::BN;
  const int warpgroup = threadIdx.x / 128;
  const int k_tiles = static_cast<int>((K + S::BK - 1) / S::BK);

  auto load_stage = [&](int slot, int kt) {
    __half* a = smem + slot * S::StageHalves;
    const std::int64_t k0 = static_cast<std::int64_t>(kt) * S::BK;
    tiles::copy_tile<S::BM, S::BK, S::Threads>(a, x, m0, e.M, k0, K);
    tiles::copy_tile<S::BN, S::BK, S::Threads>(a + S::BM * S::BK, w, n0, e.N, k0, K);
  };

  float acc[S::BN / 2];
#pragma unroll
  for (int i = 0; i < S::BN / 2; ++i) acc[i] = 0.0f;

  // Slices run Stages - 2 ahead: the slot a load overwrites was read by the wgmma batch two
  // slices back, which every warpgroup has retired (wait<1>) before the barrier below.
#pragma unroll
  for (int s = 0; s < S::Stages - 2; ++s) {
    if (s < k_tiles) load_stage(s, s);
    tiles::cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    tiles::cp_async_wait<S::Stages - 3>();
    wgmma::fence_shared_for_async();
    __syncthreads();
    const int next = kt + S::Stages - 2;
    if (next < k_tiles) load_stage(next % S::Stages, next);
    tiles::cp_async_commit();

    const __half* a = smem + (kt % S::Stages) * S::StageHalves + warpgroup * 64 * S::BK;
    const __half* b = smem + (kt % S::Stages) * S::StageHalves + S::BM * S::BK;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < S::BK / 16; ++kk) {
      wgmma_tile(acc, wgmma::smem_desc(a + kk * 16), wgmma::smem_desc(b + kk * 16));
    }
    wgmma::commit();
    wgmma::wait<1>();
  }
  wgmma::wait<0>();
  tiles::cp_async_wait<0>();

  // Accumulator layout: per n8 block j, the mma.sync fragment layout of this warp's 16 rows.
  const int lane = threadIdx.x % 32, warp_in_group = (threadIdx.x % 128) / 32;
  const std::int64_t row = m0 + warpgroup * 64 + warp_in_group * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < S::BN / 8; ++j) {
    const std::int64_t col = n0 + j * 8 + (lane % 4) * 2;
    tiles::store_pair(e, row, col, acc[4 * j], acc[4 * j + 1]);
    tiles::store_pair(e, row + 8, col, acc[4 * j + 2], acc[4 * j + 3]);
  }
#else
  (void)x, (void)w, (void)e, (void)K;
  __trap();
#endif
}

/// Writes 1 when the sm_90a pass compiled the code the driver loaded for this device.
__global__ void wgmma_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// ---- kernel launchers ----

template <class S>
void launch_shape(const __half* x, const __half* w, const Epilogue& e, std::int64_t K,
                  cudaStream_t stream) {
  opt_in_shared_memory(reinterpret_cast<const void*>(gemm_wgmma_kernel<S>), S::SmemBytes);
  gemm_wgmma_kernel<S><<<tile_grid(e, S::BM, S::BN), S::Threads, S::SmemBytes, stream>>>(x, w, e, K);
  QG_CUDA_CHECK(cudaGetLastError());
}

/// Probes once per device (a tiny synchronous launch, so the first GEMM call on a device
/// must not be inside a CUDA graph capture).
bool wgmma_runs_here() {
  static thread_local int cached_device = -1;
  static thread_local bool cached = false;
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  if (device == cached_device) return cached;
  int major = 0, minor = 0;
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  bool runs = false;
  if (major == 9 && minor == 0) {
    int* flag = nullptr;
    QG_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    wgmma_probe_kernel<<<1, 1>>>(flag);
    int value = 0;
    const cudaError_t launched = cudaGetLastError();
    const cudaError_t copied = cudaMemcpy(&value, flag, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(flag);
    QG_CUDA_CHECK(launched);
    QG_CUDA_CHECK(copied);
    runs = value == 1;
  }
  cached_device = device;
  cached = runs;
  return runs;
}

using Wide = WgmmaShape<256, 4>;    // 192 KiB smem, 128 fp32 accumulators per thread
using Square = WgmmaShape<128, 5>;  // 160 KiB smem, 64 accumulators

}  // namespace

void append_wgmma_tiles(std::vector<TileChoice>& out) {
  if (!wgmma_runs_here()) return;
  // Relative to the best mma.sync shape (1.0): wgmma issues twice the rate on Hopper.
  out.push_back({Wide::BM, Wide::BN, 2.4, launch_shape<Wide>});
  out.push_back({Square::BM, Square::BN, 2.1, launch_shape<Square>});
}

}  // namespace qg::cuda
