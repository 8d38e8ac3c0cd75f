// The training backward's GEMMs (include/qinggeng/cuda/gemm_backward.h): one block-tiled
// mma.sync kernel (sm_80/86/90) for both products, templated on how A is stored. On H100/H200
// gemm_f16_nn runs the forward's wgmma pipeline instead (gemm_wgmma.cu, W read MN-major)
// unless it must accumulate into its output.
//
//   gemm_f16_nn   A = X [M, K] (K-contiguous rows)   B = W [K, N] (N-contiguous rows)
//   gemm_f16_tn   A = dY stored [K, M]               B = X [K, N]
//
// A CTA computes a BM x BN tile of Y; a STAGES-deep cp.async pipeline streams BK-deep slices
// of A and B into swizzled shared memory. Operands stored with K as their row index
// ("MN-major": B always, A in the TN case) are kept that way in shared memory, [BK][width],
// and their fragments loaded with ldmatrix.trans, so no operand is ever transposed in memory.
// Tails in M (and in K for the TN case) are zero-filled by the copies and masked at the store.
#include <atomic>
#include <cstdint>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_backward_paths.h"
#include "cuda/gemm_paths.h"
#include "cuda/mma_tiles.cuh"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

/// What the store does (gemm_backward.h's GemmNnEpilogue in device form).
struct BackwardStore {
  void* y = nullptr;
  bool y_fp32 = false;
  bool accumulate = false;
  const __half* residual = nullptr;
  float alpha = 1.0f;
  std::int64_t M = 0, N = 0;
};

template <int kBM, int kBN, int kWarpsM, int kWarpsN>
struct Shape {
  static constexpr int BM = kBM, BN = kBN, BK = 32, Stages = 4;
  static constexpr int WarpsM = kWarpsM, WarpsN = kWarpsN;
  static constexpr int Threads = kWarpsM * kWarpsN * 32;
  static constexpr int WarpTileM = BM / WarpsM, WarpTileN = BN / WarpsN;
  static constexpr int MFrags = WarpTileM / 16, NFrags = WarpTileN / 8;
  static constexpr int StageHalves = (BM + BN) * BK;
  static constexpr int SmemBytes = Stages * StageHalves * 2;
  static_assert(WarpTileM % 16 == 0 && WarpTileN % 16 == 0, "warp tile must hold whole frags");
  static_assert(BM % 64 == 0 && BN % 64 == 0, "MN-major tile rows must be whole 128-byte lines");
};

__device__ __forceinline__ void store_pair(const BackwardStore& s, std::int64_t row,
                                           std::int64_t col, float v0, float v1) {
  if (row >= s.M || col >= s.N) return;  // N % 8 == 0: col + 1 < N too
  const std::int64_t at = row * s.N + col;
  if (s.residual != nullptr) {
    const __half2 r = *reinterpret_cast<const __half2*>(s.residual + at);
    v0 += __low2float(r) * s.alpha;
    v1 += __high2float(r) * s.alpha;
  }
  if (s.y_fp32) {
    float2* out = reinterpret_cast<float2*>(static_cast<float*>(s.y) + at);
    if (s.accumulate) {
      const float2 old = *out;
      v0 += old.x;
      v1 += old.y;
    }
    *out = make_float2(v0, v1);
  } else {
    *reinterpret_cast<__half2*>(static_cast<__half*>(s.y) + at) = __floats2half2_rn(v0, v1);
  }
}

// ---- CUDA kernel ----

/// kATrans false: A is [M, K] row-major (gemm_f16_nn); true: A is [K, M] (gemm_f16_tn).
template <class S, bool kATrans>
__global__ void __launch_bounds__(S::Threads)
    gemm_backward_kernel(const __half* __restrict__ a, const __half* __restrict__ b,
                         BackwardStore s, std::int64_t K) {
  chain_release();
  chain_wait();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __half* smem = reinterpret_cast<__half*>(smem_raw);
  const tiles::CtaPlace at = tiles::cta_place<S>();
  const std::int64_t m0 = at.m0, n0 = at.n0;
  const int lane = at.lane, wm = at.wm, wn = at.wn;
  const int k_tiles = static_cast<int>((K + S::BK - 1) / S::BK);

  auto load_stage = [&](int slot, int kt) {
    __half* sa = smem + slot * S::StageHalves;
    __half* sb = sa + S::BM * S::BK;
    const std::int64_t k0 = static_cast<std::int64_t>(kt) * S::BK;
    if constexpr (kATrans) {
      tiles::copy_mn_tile<S::BM, S::BK, S::Threads>(sa, a, k0, K, m0, s.M);
    } else {
      tiles::copy_tile<S::BM, S::BK, S::Threads>(sa, a, m0, s.M, k0, K);
    }
    tiles::copy_mn_tile<S::BN, S::BK, S::Threads>(sb, b, k0, K, n0, s.N);
  };

  float acc[S::MFrags][S::NFrags][4];
  tiles::zero_warp_tile(acc);

  tiles::pipelined_k_loop<S::Stages>(k_tiles, load_stage, [&](int slot) {
    const __half* sa = smem + slot * S::StageHalves;
    const __half* sb = sa + S::BM * S::BK;
#pragma unroll
    for (int kk = 0; kk < S::BK / 16; ++kk) {
      std::uint32_t af[S::MFrags][4];
      std::uint32_t bf[S::NFrags][2];
#pragma unroll
      for (int i = 0; i < S::MFrags; ++i) {
        const int m = wm * S::WarpTileM + i * 16;
        if constexpr (kATrans) {
          // Matrices (m 0-7, k lo), (m 8-15, k lo), (m 0-7, k hi), (m 8-15, k hi), each read
          // transposed from 8 k rows.
          const int mat = lane / 8;
          const int k = kk * 16 + (mat / 2) * 8 + lane % 8;
          tiles::ldmatrix_x4_trans(af[i], tiles::mn_at<S::BM>(sa, k, m + (mat % 2) * 8));
        } else {
          tiles::load_a_fragment<S::BK>(af[i], sa, m, kk, lane);
        }
      }
#pragma unroll
      for (int j = 0; j < S::NFrags / 2; ++j) {
        // Matrices (k lo, n 0-7), (k hi, n 0-7), (k lo, n 8-15), (k hi, n 8-15), transposed.
        const int mat = lane / 8;
        const int k = kk * 16 + (mat % 2) * 8 + lane % 8;
        const int n = wn * S::WarpTileN + j * 16 + (mat / 2) * 8;
        std::uint32_t r[4];
        tiles::ldmatrix_x4_trans(r, tiles::mn_at<S::BN>(sb, k, n));
        tiles::set_b_pair(bf, j, r);
      }
      tiles::mma_warp_tile(acc, af, bf);
    }
  });

  tiles::store_warp_tile(acc, m0 + wm * S::WarpTileM, n0 + wn * S::WarpTileN, lane,
                         [&](std::int64_t row, std::int64_t col, float v0, float v1) {
                           store_pair(s, row, col, v0, v1);
                         });
}

// ---- kernel launchers ----

using Big = Shape<128, 256, 2, 4>;  // 8 warps of 64x64, 96 KiB smem
using Mid = Shape<128, 128, 2, 2>;  // 4 warps of 64x64, 64 KiB
using Small = Shape<64, 128, 2, 2>;  // 4 warps of 32x64, 48 KiB

template <class S, bool kATrans>
void launch(const __half* a, const __half* b, const BackwardStore& s, std::int64_t K,
            cudaStream_t stream) {
  const auto kernel = gemm_backward_kernel<S, kATrans>;
  opt_in_shared_memory(reinterpret_cast<const void*>(kernel), S::SmemBytes);
  const dim3 grid(static_cast<unsigned>((s.M + S::BM - 1) / S::BM),
                  static_cast<unsigned>((s.N + S::BN - 1) / S::BN));
  launch_chained(kernel, dim3(grid), dim3(S::Threads), S::SmemBytes, stream, a, b, s, K);
}

std::int64_t tiles_of(std::int64_t M, std::int64_t N, int bm, int bn) {
  return ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
}

// The biggest tile that still gives every SM work.
template <bool kATrans>
void run(const __half* a, const __half* b, const BackwardStore& s, std::int64_t K,
         cudaStream_t stream) {
  const std::int64_t sms = multiprocessor_count();
  if (tiles_of(s.M, s.N, Big::BM, Big::BN) >= sms) {
    launch<Big, kATrans>(a, b, s, K, stream);
  } else if (tiles_of(s.M, s.N, Mid::BM, Mid::BN) >= sms / 2) {
    launch<Mid, kATrans>(a, b, s, K, stream);
  } else {
    launch<Small, kATrans>(a, b, s, K, stream);
  }
}

std::atomic<int> g_forced_path{static_cast<int>(GemmBackwardPath::Auto)};

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_common(const void* a, const void* b, const void* y, std::int64_t M, std::int64_t N,
                  std::int64_t K, const char* op) {
  QG_CHECK(a && b && y, op, ": null pointer");
  QG_CHECK(M > 0 && N > 0 && K > 0, op, ": sizes M ", M, ", N ", N, ", K ", K,
           " must be positive");
  QG_CHECK(aligned16(a) && aligned16(b), op, ": operands must be 16-byte aligned");
  QG_CHECK(N % 8 == 0, op, ": N = ", N, " must be a multiple of 8");
  QG_CHECK((N + 63) / 64 < 65536, op, ": N = ", N, " exceeds one launch grid");
}

}  // namespace

void force_gemm_backward_path(GemmBackwardPath path) {
  g_forced_path.store(static_cast<int>(path));
}

void gemm_f16_nn(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32,
                 std::int64_t M, std::int64_t N, std::int64_t K, const GemmNnEpilogue& epilogue,
                 cudaStream_t stream) {
  check_common(x, w, y, M, N, K, "gemm_f16_nn");
  QG_CHECK(K % 8 == 0, "gemm_f16_nn: K = ", K, " must be a multiple of 8");
  QG_CHECK(!epilogue.accumulate || y_fp32, "gemm_f16_nn: accumulate needs an fp32 output");
  QG_CHECK(reinterpret_cast<std::uintptr_t>(y) % (y_fp32 ? 8 : 4) == 0,
           "gemm_f16_nn: y is misaligned");
  QG_CHECK(epilogue.residual == nullptr ||
               reinterpret_cast<std::uintptr_t>(epilogue.residual) % 4 == 0,
           "gemm_f16_nn: residual is misaligned");
  if (!epilogue.accumulate && g_forced_path.load() == static_cast<int>(GemmBackwardPath::Auto)) {
    // Hopper: the forward's TMA + wgmma pipeline reading W MN-major.
    tiles::Epilogue e;
    e.kind = epilogue.residual != nullptr ? 4 : 0;
    e.residual = reinterpret_cast<const __half*>(epilogue.residual);
    e.alpha = epilogue.alpha;
    e.y = y;
    e.y_fp32 = y_fp32;
    e.M = M;
    e.N = N;
    if (launch_wgmma_nn(reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(w), e,
                        K, stream)) {
      return;
    }
  }
  BackwardStore s;
  s.y = y;
  s.y_fp32 = y_fp32;
  s.accumulate = epilogue.accumulate;
  s.residual = reinterpret_cast<const __half*>(epilogue.residual);
  s.alpha = epilogue.alpha;
  s.M = M;
  s.N = N;
  run<false>(reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(w), s, K, stream);
}

void gemm_f16_tn(const std::uint16_t* a, const std::uint16_t* b, float* y, bool accumulate,
                 std::int64_t M, std::int64_t N, std::int64_t K, cudaStream_t stream) {
  check_common(a, b, y, M, N, K, "gemm_f16_tn");
  QG_CHECK(M % 8 == 0, "gemm_f16_tn: M = ", M, " must be a multiple of 8");
  QG_CHECK(reinterpret_cast<std::uintptr_t>(y) % 8 == 0, "gemm_f16_tn: y is misaligned");
  BackwardStore s;
  s.y = y;
  s.y_fp32 = true;
  s.accumulate = accumulate;
  s.M = M;
  s.N = N;
  run<true>(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b), s, K, stream);
}

}  // namespace qg::cuda
