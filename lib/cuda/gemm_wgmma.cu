// Hopper GEMM (sm_90a): a warp-specialised pipeline. One producer warpgroup drives the TMA
// copy engine, which streams 64-wide K slices of X and W into 128-byte-swizzled shared
// memory (the layout wgmma reads through its descriptors) and signals per-slot "full"
// mbarriers; two consumer warpgroups each run wgmma on 64 rows of the 128 x BN tile, keep one
// batch in flight, and hand slots back through "empty" mbarriers. No CTA-wide barrier in the
// main loop. TMA zero-fills rows and columns past M, N and K, so tails need no special code.
// The epilogue stages the fp32 tile in the idle slots and stores it row by row with 16-byte
// coalesced accesses (tiles::store_row8): a short loop, not per-thread stores unrolled over
// the accumulators, whose code size made the instruction cache the bottleneck of every tile.
// A residual epilogue's operand comes ahead into shared memory, 8 groups a thread in flight.
// The same kernel also runs the training backward's dX = dY W (gemm_backward.h) with W read as
// stored, [K, N]: TMA brings {64 columns, 64 k rows} boxes and wgmma reads B MN-major
// (its transpose-B mode), so no transposed weight copy exists. A forward low-rank term
// (GemmLowRank: the LoRA term of training) is one more 64-wide K slice per 64 of its rank,
// loaded from U and V by their own descriptors into the same stages. Launched chained
// (chained_launch.cuh): barrier set-up and an L2 prefetch of the first W slices overlap the
// previous kernel's tail.
// Built for sm_90a only (lib/CMakeLists.txt adds that target to this file); append_wgmma_tiles
// offers these shapes only after a probe saw the sm_90a code run on the current device.
#include <cuda.h>  // CUtensorMap (types only; the encoder comes through the runtime)
#include <cudaTypedefs.h>

#include <cstdint>
#include <vector>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "cuda/wgmma_ops.cuh"

namespace qg::cuda {
namespace {

using tiles::Epilogue;

template <int kBN, int kStages>
struct WgmmaShape {
  static constexpr int BM = 128, BN = kBN, BK = 64, Stages = kStages;
  static constexpr int Threads = 384;  // producer warpgroup + two consumer warpgroups
  static constexpr int ABytes = BM * BK * 2, BBytes = BN * BK * 2;
  static constexpr int StageBytes = ABytes + BBytes;
  // Stages, then 2 * Stages mbarriers, plus slack to align the base to the swizzle period.
  static constexpr int SmemBytes = Stages * StageBytes + 2 * Stages * 8 + 1024;
  // The epilogue stages the fp32 tile over the (then idle) slots, rows padded by 8 floats so
  // the accumulator stores of a half-warp (4 rows x 8 columns) hit 32 different banks.
  static constexpr int StagePitch = BN + 8;
  static_assert(BM * StagePitch * 4 <= Stages * StageBytes, "staged tile exceeds the slots");
};

// ---- CUDA kernels ----

/// kBTrans false: W is [N, K] (a Linear weight, forward); true: W is [K, N] (dX = dY W).
template <class S, bool kBTrans>
__global__ void __launch_bounds__(S::Threads, 1)
    gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_x,
                      const __grid_constant__ CUtensorMap map_w,
                      const __grid_constant__ CUtensorMap map_u,
                      const __grid_constant__ CUtensorMap map_v, Epilogue e, std::int64_t K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes and wgmma assumes tiles start on it.
  auto* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  auto* full = reinterpret_cast<std::uint64_t*>(smem + S::Stages * S::StageBytes);
  std::uint64_t* empty = full + S::Stages;
  const int m0 = static_cast<int>(blockIdx.x) * S::BM;
  const int n0 = static_cast<int>(blockIdx.y) * S::BN;
  const int warpgroup = threadIdx.x / 128;
  // The slices of X W^T, then those of the low-rank term U V^T (map_u, map_v), if any.
  const int main_tiles = static_cast<int>((K + S::BK - 1) / S::BK);
  const int k_tiles = main_tiles + static_cast<int>((e.lr_rank + S::BK - 1) / S::BK);

  chain_release();
  if (threadIdx.x == 0) {
    wgmma::tma_prefetch_descriptor(&map_x);
    wgmma::tma_prefetch_descriptor(&map_w);
    if (k_tiles > main_tiles) {
      wgmma::tma_prefetch_descriptor(&map_u);
      wgmma::tma_prefetch_descriptor(&map_v);
    }
    // While the previous kernel of the stream drains (chained launch): the first slices of W
    // into L2, which a prefetch may do before the wait.
    for (int kt = 0; kt < S::Stages && kt < main_tiles; ++kt) {
      if constexpr (kBTrans) {
        for (int j = 0; j < S::BN / 64; ++j) {
          wgmma::tma_prefetch_l2_2d(&map_w, n0 + 64 * j, kt * S::BK);
        }
      } else {
        wgmma::tma_prefetch_l2_2d(&map_w, kt * S::BK, n0);
      }
    }
    for (int s = 0; s < S::Stages; ++s) {
      wgmma::barrier_init(&full[s], 1);   // the producer's expect_tx arrival
      wgmma::barrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    wgmma::barrier_init_fence();
  }
  chain_wait();
  __syncthreads();

  if (warpgroup == 0) {
    wgmma::shrink_registers<40>();
    if (threadIdx.x == 0) {
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int slot = kt % S::Stages;
        // Reusing a slot: wait until both consumers retired the slice that was in it.
        if (kt >= S::Stages) wgmma::barrier_wait(&empty[slot], (kt / S::Stages - 1) & 1);
        unsigned char* a = smem + slot * S::StageBytes;
        wgmma::barrier_arrive_expect_bytes(&full[slot], S::StageBytes);
        if (kt >= main_tiles) {  // a low-rank slice (forward only: gemm_f16)
          const int k0 = (kt - main_tiles) * S::BK;
          wgmma::tma_load_2d(a, &map_u, k0, m0, &full[slot]);
          wgmma::tma_load_2d(a + S::ABytes, &map_v, k0, n0, &full[slot]);
          continue;
        }
        wgmma::tma_load_2d(a, &map_x, kt * S::BK, m0, &full[slot]);
        if constexpr (kBTrans) {
          // BN / 64 boxes of {64 columns, BK k rows}, one after another.
          for (int j = 0; j < S::BN / 64; ++j) {
            wgmma::tma_load_2d(a + S::ABytes + j * 64 * S::BK * 2, &map_w, n0 + 64 * j,
                               kt * S::BK, &full[slot]);
          }
        } else {
          wgmma::tma_load_2d(a + S::ABytes, &map_w, kt * S::BK, n0, &full[slot]);
        }
      }
    }
    return;
  }

  wgmma::grow_registers<232>();
  const int consumer = warpgroup - 1;
  // One m64n128 accumulator per 128 columns of the tile (a 256-wide tile issues two).
  constexpr int kHalves = S::BN / 128;
  float acc[kHalves][64];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0.0f;
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int slot = kt % S::Stages;
    wgmma::barrier_wait(&full[slot], (kt / S::Stages) & 1);
    const auto* a = reinterpret_cast<const __half*>(smem + slot * S::StageBytes) +
                    consumer * 64 * S::BK;
    const auto* b = reinterpret_cast<const __half*>(smem + slot * S::StageBytes + S::ABytes);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < S::BK / 16; ++kk) {
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        if constexpr (kBTrans) {
          // Columns h*128.. are boxes 2h, 2h + 1; k step kk is 16 rows of 128 bytes.
          wgmma::wgmma_m64n128k16<1>(
              acc[h], wgmma::smem_desc(a + kk * 16),
              wgmma::smem_desc_mn(b + h * 128 * S::BK + kk * 16 * 64, 64 * S::BK * 2), 1);
        } else {
          wgmma::wgmma_m64n128k16(acc[h], wgmma::smem_desc(a + kk * 16),
                                  wgmma::smem_desc(b + h * 128 * S::BK + kk * 16), 1);
        }
      }
    }
    wgmma::commit();
    wgmma::wait<1>();  // the previous slice's batch is done: its slot can be refilled
    if (kt > 0 && threadIdx.x % 128 == 0) wgmma::barrier_arrive(&empty[(kt - 1) % S::Stages]);
  }
  wgmma::wait<0>();

  // Epilogue through shared memory. Once both consumer warpgroups' wgmma are done the slots
  // are idle (every TMA copy landed before its slice was consumed): the accumulators go there
  // as fp32, then each warp applies the epilogue to whole rows, 8 columns per thread, with
  // 16-byte coalesced loads and stores, in a short loop. (Storing straight from the
  // accumulator registers unrolls to 64 pair stores per thread, each carrying every epilogue
  // kind: ~130 KB of code run once per tile, which missed the instruction cache and cost
  // ~20 us per tile, more than half of a K = 4096 tile's time.)
  constexpr int kConsumerThreads = S::Threads - 128;
  wgmma::named_barrier_sync(1, kConsumerThreads);
  auto* staged = reinterpret_cast<float*>(smem);
  // A residual epilogue's loads: a thread's next kBatch groups are fetched together with
  // cp.async into its own shared-memory slots behind the staged tile (the first batch while the
  // tile is staged), then stored one by one. (Loaded in the store loop, one at a time — a store
  // may overwrite the residual it adds, so the compiler may not hoist the next load above it —
  // they cost ~14 us a tile.) The loops stay (nearly) rolled: code size, not arithmetic, bounds
  // this epilogue (see above).
  const bool vectors = tiles::row8_vectors_ok(e);
  constexpr int kGroupsPerRow = S::BN / 8, kGroups = S::BM * kGroupsPerRow;
  constexpr int kBatch = 8, kStagedBytes = S::BM * S::StagePitch * 4;
  static_assert(kGroups % (kBatch * kConsumerThreads) == 0, "whole batches");
  static_assert(kStagedBytes + kBatch * kConsumerThreads * 16 <= S::Stages * S::StageBytes,
                "residual slots exceed the idle stages");
  auto* residual_slots = reinterpret_cast<uint4*>(smem + kStagedBytes);
  const int ct = static_cast<int>(threadIdx.x) - 128;
  const bool prefetch = e.kind >= 3 && vectors;
  const auto fetch_residuals = [&](int g0) {  // groups g0 + b * kConsumerThreads, b < kBatch
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int g = g0 + b * kConsumerThreads;
      const std::int64_t row = m0 + g / kGroupsPerRow, col = n0 + g % kGroupsPerRow * 8;
      const bool in = tiles::row8_vector_path(e, row, col, vectors);
      tiles::cp_async_16(residual_slots + b * kConsumerThreads + ct,
                         in ? e.residual + row * e.N + col : e.residual, in);
    }
    tiles::cp_async_commit();
  };
  // Both warpgroups' wgmma are done: the slots, past the staged tile, are free.
  if (prefetch) fetch_residuals(ct);
  // Accumulator layout: per n8 block j, the mma.sync fragment layout of this warp's 16 rows.
  const int lane = threadIdx.x % 32, warp_in_group = (threadIdx.x % 128) / 32;
  const int tile_row = consumer * 64 + warp_in_group * 16 + lane / 4;
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      float* at = staged + tile_row * S::StagePitch + h * 128 + j * 8 + (lane % 4) * 2;
      *reinterpret_cast<float2*>(at) = make_float2(acc[h][4 * j], acc[h][4 * j + 1]);
      *reinterpret_cast<float2*>(at + 8 * S::StagePitch) =
          make_float2(acc[h][4 * j + 2], acc[h][4 * j + 3]);
    }
  }
  wgmma::named_barrier_sync(1, kConsumerThreads);
#pragma unroll 1
  for (int g0 = ct; g0 < kGroups; g0 += kBatch * kConsumerThreads) {
    if (prefetch) {
      tiles::cp_async_wait<0>();      // this thread's own slots only: no barrier, but the reads
      asm volatile("" ::: "memory");  // below must not move above the wait
    }
#pragma unroll 2
    for (int b = 0; b < kBatch; ++b) {
      const int g = g0 + b * kConsumerThreads;
      const int r = g / kGroupsPerRow, c = (g % kGroupsPerRow) * 8;
      const float4 lo = *reinterpret_cast<const float4*>(staged + r * S::StagePitch + c);
      const float4 hi = *reinterpret_cast<const float4*>(staged + r * S::StagePitch + c + 4);
      float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      tiles::store_row8(e, std::int64_t{m0} + r, std::int64_t{n0} + c, v, vectors,
                        residual_slots[b * kConsumerThreads + ct]);
    }
    // The next batch into the same slots, after this batch's reads: the cp.async helpers
    // declare no memory effects, so a compiler barrier keeps the slot loads above them.
    if (prefetch && g0 + kBatch * kConsumerThreads < kGroups) {
      asm volatile("" ::: "memory");
      fetch_residuals(g0 + kBatch * kConsumerThreads);
    }
  }
#else
  (void)map_x, (void)map_w, (void)map_u, (void)map_v, (void)e, (void)K;
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

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    QG_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                   cudaEnableDefault, &found));
#else
    QG_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found));
#endif
    QG_CHECK(found == cudaDriverEntryPointSuccess && fn,
             "gemm_f16: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

/// TMA descriptor of a row-major fp16 [rows, K] matrix read in 64 x box_rows boxes with the
/// 128-byte swizzle (K % 8 == 0 keeps the row pitch a multiple of 16 bytes, as TMA needs).
CUtensorMap tensor_map(const __half* base, std::int64_t rows, std::int64_t K, int box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t pitch[1] = {static_cast<cuuint64_t>(K) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t step[2] = {1, 1};
  const CUresult status = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<__half*>(base), dims, pitch, box,
      step, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  QG_CHECK(status == CUDA_SUCCESS, "gemm_f16: cuTensorMapEncodeTiled failed (error ", status,
           ") for a [", rows, ", ", K, "] operand");
  return map;
}

template <class S, bool kBTrans = false>
void launch_shape(const __half* x, const __half* w, const Epilogue& e, std::int64_t K,
                  cudaStream_t stream) {
  QG_CHECK(e.M < (std::int64_t{1} << 31) && e.N < (std::int64_t{1} << 31) &&
               K < (std::int64_t{1} << 31),
           "gemm_f16: sizes beyond 2^31 exceed TMA coordinates");
  const auto kernel = gemm_wgmma_kernel<S, kBTrans>;
  opt_in_shared_memory(reinterpret_cast<const void*>(kernel), S::SmemBytes);
  const CUtensorMap map_x = tensor_map(x, e.M, K, S::BM);
  // [K, N] read in {64 columns, BK rows} boxes, or [N, K] in {64, BN}.
  const CUtensorMap map_w = kBTrans ? tensor_map(w, K, e.N, S::BK) : tensor_map(w, e.N, K, S::BN);
  // U [M, rank] and V [N, rank] in the same boxes as X and W; without a low-rank term the
  // kernel never reads them.
  QG_CHECK(!kBTrans || e.lr_rank == 0, "gemm_f16_nn: no low-rank term");
  const bool low_rank = e.lr_rank > 0;
  const CUtensorMap map_u = low_rank ? tensor_map(e.lr_u, e.M, e.lr_rank, S::BM) : map_x;
  const CUtensorMap map_v = low_rank ? tensor_map(e.lr_v, e.N, e.lr_rank, S::BN) : map_w;
  launch_chained(kernel, tile_grid(e, S::BM, S::BN), dim3(S::Threads), S::SmemBytes, stream, map_x,
                 map_w, map_u, map_v, e, K);
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
using Square = WgmmaShape<128, 6>;  // 192 KiB smem, 64 accumulators

}  // namespace

bool launch_wgmma_nn(const __half* x, const __half* w, const tiles::Epilogue& e, std::int64_t K,
                     cudaStream_t stream) {
  if (!wgmma_runs_here() || e.N % 64 != 0) return false;
  const std::int64_t wide = ((e.M + Wide::BM - 1) / Wide::BM) * (e.N / Wide::BN);
  if (e.N % Wide::BN == 0 && wide >= multiprocessor_count()) {
    launch_shape<Wide, true>(x, w, e, K, stream);
  } else {
    launch_shape<Square, true>(x, w, e, K, stream);
  }
  return true;
}

void append_wgmma_tiles(std::vector<TileChoice>& out) {
  if (!wgmma_runs_here()) return;
  // Relative to the best mma.sync shape (1.0): wgmma issues twice the rate on Hopper.
  out.push_back({Wide::BM, Wide::BN, 2.4, launch_shape<Wide>});
  out.push_back({Square::BM, Square::BN, 2.1, launch_shape<Square>});
}

}  // namespace qg::cuda
