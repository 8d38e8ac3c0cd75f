// Block-tiled fp16 tensor-core GEMM (Ampere-style, runs on sm_80/86/90): each CTA computes a
// BM x BN tile of Y; a STAGES-deep cp.async pipeline streams BK-wide slices of X and W into
// swizzled shared memory while the warps run ldmatrix + mma.sync on the previous slices; the
// epilogue is applied to the fp32 accumulators in registers. Tails in M, N and K are
// zero-filled by the copies and masked at the store, so any M, N and K % 8 == 0 work. A
// low-rank term (GemmLowRank) is more K slices of the same pipeline, read from U and V.
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"

namespace qg::cuda {
namespace {

using tiles::Epilogue;

template <int kBM, int kBN, int kBK, int kWarpsM, int kWarpsN, int kStages>
struct TileShape {
  static constexpr int BM = kBM, BN = kBN, BK = kBK, Stages = kStages;
  static constexpr int WarpsM = kWarpsM, WarpsN = kWarpsN;
  static constexpr int Threads = kWarpsM * kWarpsN * 32;
  static constexpr int WarpTileM = BM / WarpsM, WarpTileN = BN / WarpsN;
  static constexpr int MFrags = WarpTileM / 16, NFrags = WarpTileN / 8;
  static constexpr int StageHalves = (BM + BN) * BK;
  static constexpr int SmemBytes = Stages * StageHalves * 2;
  static_assert(WarpTileM % 16 == 0 && WarpTileN % 16 == 0, "warp tile must hold whole frags");
  static_assert((BM * BK / 8) % Threads == 0 && (BN * BK / 8) % Threads == 0,
                "every thread copies the same number of 16-byte chunks");
};

// ---- CUDA kernels ----

template <class S>
__global__ void __launch_bounds__(S::Threads)
    gemm_tiled_kernel(const __half* __restrict__ x, const __half* __restrict__ w, Epilogue e,
                      std::int64_t K) {
  chain_release();
  chain_wait();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __half* smem = reinterpret_cast<__half*>(smem_raw);
  const tiles::CtaPlace at = tiles::cta_place<S>();
  const std::int64_t m0 = at.m0, n0 = at.n0;
  const int lane = at.lane, wm = at.wm, wn = at.wn;
  // The slices of X W^T, then those of the low-rank term U V^T (GemmLowRank), if any.
  const int main_tiles = static_cast<int>((K + S::BK - 1) / S::BK);
  const int k_tiles = main_tiles + static_cast<int>((e.lr_rank + S::BK - 1) / S::BK);

  auto load_stage = [&](int slot, int kt) {
    __half* a = smem + slot * S::StageHalves;
    __half* b = a + S::BM * S::BK;
    if (kt < main_tiles) {
      const std::int64_t k0 = static_cast<std::int64_t>(kt) * S::BK;
      tiles::copy_tile<S::BM, S::BK, S::Threads>(a, x, m0, e.M, k0, K);
      tiles::copy_tile<S::BN, S::BK, S::Threads>(b, w, n0, e.N, k0, K);
    } else {
      const std::int64_t k0 = static_cast<std::int64_t>(kt - main_tiles) * S::BK;
      tiles::copy_tile<S::BM, S::BK, S::Threads>(a, e.lr_u, m0, e.M, k0, e.lr_rank);
      tiles::copy_tile<S::BN, S::BK, S::Threads>(b, e.lr_v, n0, e.N, k0, e.lr_rank);
    }
  };

  float acc[S::MFrags][S::NFrags][4];
  tiles::zero_warp_tile(acc);

  tiles::pipelined_k_loop<S::Stages>(k_tiles, load_stage, [&](int slot) {
    const __half* a = smem + slot * S::StageHalves;
    const __half* b = a + S::BM * S::BK;
#pragma unroll
    for (int kk = 0; kk < S::BK / 16; ++kk) {
      std::uint32_t af[S::MFrags][4];
      std::uint32_t bf[S::NFrags][2];
#pragma unroll
      for (int i = 0; i < S::MFrags; ++i) {
        tiles::load_a_fragment<S::BK>(af[i], a, wm * S::WarpTileM + i * 16, kk, lane);
      }
#pragma unroll
      for (int j = 0; j < S::NFrags / 2; ++j) {
        // Matrices: (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi).
        const int row = wn * S::WarpTileN + j * 16 + (lane % 8) + (lane / 16) * 8;
        const int chunk = kk * 2 + (lane / 8) % 2;
        std::uint32_t r[4];
        tiles::ldmatrix_x4(r, b + row * S::BK + tiles::swizzle_chunk<S::BK>(row, chunk) * 8);
        tiles::set_b_pair(bf, j, r);
      }
      tiles::mma_warp_tile(acc, af, bf);
    }
  });

  tiles::store_warp_tile(acc, m0 + wm * S::WarpTileM, n0 + wn * S::WarpTileN, lane,
                         [&](std::int64_t row, std::int64_t col, float v0, float v1) {
                           tiles::store_pair(e, row, col, v0, v1);
                         });
}

// ---- kernel launchers ----

template <class S>
void launch_shape(const __half* x, const __half* w, const Epilogue& e, std::int64_t K,
                  cudaStream_t stream) {
  opt_in_shared_memory(reinterpret_cast<const void*>(gemm_tiled_kernel<S>), S::SmemBytes);
  launch_chained(gemm_tiled_kernel<S>, dim3(tile_grid(e, S::BM, S::BN)), dim3(S::Threads),
                 S::SmemBytes, stream, x, w, e, K);
}

using Big = TileShape<128, 256, 32, 2, 4, 4>;   // 8 warps of 64x64, 96 KiB smem
using Mid = TileShape<128, 128, 32, 2, 2, 4>;   // 4 warps of 64x64, 64 KiB
using Small = TileShape<64, 128, 32, 2, 2, 4>;  // 4 warps of 32x64, 48 KiB
using Tiny = TileShape<64, 64, 32, 2, 2, 4>;    // 4 warps of 32x32, 32 KiB

}  // namespace

void append_mma_sync_tiles(std::vector<TileChoice>& out) {
  // Efficiencies: bigger warp tiles reuse each fragment more (v1 measurements on H100).
  out.push_back({Big::BM, Big::BN, 1.0, launch_shape<Big>});
  out.push_back({Mid::BM, Mid::BN, 0.92, launch_shape<Mid>});
  out.push_back({Small::BM, Small::BN, 0.8, launch_shape<Small>});
  out.push_back({Tiny::BM, Tiny::BN, 0.65, launch_shape<Tiny>});
}

}  // namespace qg::cuda
