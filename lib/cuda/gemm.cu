// qg::cuda::gemm_f16: argument checks, the choice of kernel family and tile shape (see
// include/qinggeng/cuda/gemm.h), and the launch plumbing the families share.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "qinggeng/cuda/gemm.h"

namespace qg::cuda {
namespace {

bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

std::vector<TileChoice> tile_choices(GemmPath path) {
  std::vector<TileChoice> choices;
  if (path != GemmPath::Wgmma) append_mma_sync_tiles(choices);
  if (path != GemmPath::Tiled) append_wgmma_tiles(choices);
  QG_CHECK(!choices.empty(), "gemm_f16: the wgmma path needs an sm_90 GPU and a build that "
           "includes sm_90 (CMAKE_CUDA_ARCHITECTURES)");
  return choices;
}

/// The cheapest shape: CTAs on the busiest SM times the tile's area, over its efficiency.
/// Larger and faster tiles win once there are enough of them to fill the chip.
const TileChoice& cheapest(const std::vector<TileChoice>& choices, std::int64_t M,
                           std::int64_t N) {
  const int sms = multiprocessor_count();
  const TileChoice* best = nullptr;
  double best_cost = 0;
  for (const TileChoice& c : choices) {
    const std::int64_t tiles = ((M + c.bm - 1) / c.bm) * ((N + c.bn - 1) / c.bn);
    const double cost = static_cast<double>((tiles + sms - 1) / sms) * c.bm * c.bn / c.efficiency;
    if (!best || cost < best_cost) {
      best = &c;
      best_cost = cost;
    }
  }
  return *best;
}

/// Skinny for decode batches; up to kGemmSkinnyMaxM also when the best tiling fills under
/// half of the SMs (M = 64 on a 4096-wide layer: 32 tiles for 132 SMs), where streaming W
/// with every SM beats tensor-core tiles that leave most of the chip idle. Measured on H100
/// at M = 64: dense 30 us skinny vs 40 us tiled; qkv (96 tiles) 49 us tiled vs 78 us skinny.
bool prefer_skinny(std::int64_t M, std::int64_t N, const TileChoice& tiled) {
  if (M <= kGemmDecodeMaxM) return true;
  if (M > kGemmSkinnyMaxM) return false;
  const std::int64_t tiles = ((M + tiled.bm - 1) / tiled.bm) * ((N + tiled.bn - 1) / tiled.bn);
  return tiles * 2 < multiprocessor_count();
}

}  // namespace

int multiprocessor_count() {
  static thread_local int cached_device = -1, cached_sms = 0;
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  if (device != cached_device) {
    QG_CUDA_CHECK(cudaDeviceGetAttribute(&cached_sms, cudaDevAttrMultiProcessorCount, device));
    cached_device = device;
  }
  return cached_sms;
}

void opt_in_shared_memory(const void* kernel, int bytes) {
  static thread_local std::vector<std::pair<const void*, int>> done;  // (kernel, device)
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  for (const auto& d : done) {
    if (d.first == kernel && d.second == device) return;
  }
  QG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.emplace_back(kernel, device);
}

dim3 tile_grid(const tiles::Epilogue& e, int bm, int bn) {
  const std::int64_t m_tiles = (e.M + bm - 1) / bm, n_tiles = (e.N + bn - 1) / bn;
  QG_CHECK(n_tiles <= 65535 && m_tiles <= 0x7fffffff, "gemm_f16: N = ", e.N, " or M = ", e.M,
           " is too large for one launch");
  return dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
}

tiles::Epilogue device_epilogue(const GemmEpilogue& epilogue, void* y, bool y_fp32,
                                std::int64_t M, std::int64_t N, const char* op) {
  QG_CHECK(aligned(y, y_fp32 ? 8 : 4), op, ": y must be ", y_fp32 ? 8 : 4, "-byte aligned");
  const bool has_bias = epilogue.kind != GemmEpilogue::Kind::None;
  QG_CHECK(!has_bias || epilogue.bias, op, ": this epilogue needs a bias pointer");
  const bool has_residual = epilogue.kind == GemmEpilogue::Kind::BiasResidual;
  QG_CHECK(!has_residual || (epilogue.residual && aligned(epilogue.residual, 4)), op,
           ": the residual epilogue needs a 4-byte aligned residual pointer");
  tiles::Epilogue e;
  e.kind = static_cast<int>(epilogue.kind);
  e.bias = has_bias ? reinterpret_cast<const __half*>(epilogue.bias) : nullptr;
  e.residual = has_residual ? reinterpret_cast<const __half*>(epilogue.residual) : nullptr;
  e.alpha = epilogue.alpha;
  e.y = y;
  e.y_fp32 = y_fp32;
  e.M = M;
  e.N = N;
  return e;
}

std::string gemm_plan(std::int64_t M, std::int64_t N) {
  const std::vector<TileChoice> choices = tile_choices(GemmPath::Auto);
  const TileChoice& c = cheapest(choices, M, N);
  if (prefer_skinny(M, N, c)) return "skinny";
  std::vector<TileChoice> wgmma;
  append_wgmma_tiles(wgmma);
  bool is_wgmma = false;
  for (const TileChoice& t : wgmma) is_wgmma = is_wgmma || t.launch == c.launch;
  return std::string(is_wgmma ? "wgmma " : "mma.sync ") + std::to_string(c.bm) + "x" +
         std::to_string(c.bn);
}

void gemm_f16(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32,
              std::int64_t M, std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
              cudaStream_t stream, GemmPath path) {
  gemm_f16(x, w, y, y_fp32, M, N, K, epilogue, GemmLowRank{}, stream, path);
}

void gemm_f16(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32, std::int64_t M,
              std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
              const GemmLowRank& low_rank, cudaStream_t stream, GemmPath path) {
  QG_CHECK(M >= 0 && N > 0 && K > 0, "gemm_f16: sizes must be positive (M = ", M, ", N = ", N,
           ", K = ", K, ")");
  QG_CHECK(K % 8 == 0, "gemm_f16: K = ", K, " must be a multiple of 8");
  QG_CHECK(path != GemmPath::Skinny || M <= kGemmSkinnyMaxM, "gemm_f16: the skinny path takes M <= ",
           kGemmSkinnyMaxM, ", got M = ", M);
  const bool has_low_rank = low_rank.u != nullptr;
  if (has_low_rank) {
    QG_CHECK(low_rank.v && low_rank.rank > 0 && low_rank.rank % 8 == 0,
             "gemm_f16: a low-rank term needs v and a rank that is a positive multiple of 8 "
             "(rank ",
             low_rank.rank, ")");
    QG_CHECK(aligned(low_rank.u, 16) && aligned(low_rank.v, 16),
             "gemm_f16: the low-rank u and v must be 16-byte aligned");
    QG_CHECK(path != GemmPath::Skinny,
             "gemm_f16: the skinny path has no low-rank term; use Auto or a tile path");
  }
  if (M == 0) return;
  QG_CHECK(x && w && y, "gemm_f16: x, w and y must be device pointers (got a null pointer)");
  QG_CHECK(aligned(x, 16) && aligned(w, 16), "gemm_f16: x and w must be 16-byte aligned");
  tiles::Epilogue e = device_epilogue(epilogue, y, y_fp32, M, N, "gemm_f16");
  if (has_low_rank) {
    e.lr_u = reinterpret_cast<const __half*>(low_rank.u);
    e.lr_v = reinterpret_cast<const __half*>(low_rank.v);
    e.lr_rank = low_rank.rank;
  }
  const auto* xh = reinterpret_cast<const __half*>(x);
  const auto* wh = reinterpret_cast<const __half*>(w);
  if (path == GemmPath::Skinny ||
      (path == GemmPath::Auto && !has_low_rank && M <= kGemmDecodeMaxM)) {
    launch_gemm_skinny(xh, wh, e, K, stream);
    return;
  }
  const std::vector<TileChoice> choices = tile_choices(path);
  const TileChoice& tiled = cheapest(choices, M, N);
  if (path == GemmPath::Auto && !has_low_rank && prefer_skinny(M, N, tiled)) {
    launch_gemm_skinny(xh, wh, e, K, stream);
  } else {
    tiled.launch(xh, wh, e, K, stream);
  }
}

void gemm_f16_layer_norm(const std::uint16_t* x, const std::uint16_t* gamma,
                         const std::uint16_t* beta, float eps, std::uint16_t* normed,
                         const std::uint16_t* w, void* y, bool y_fp32, std::int64_t M,
                         std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
                         cudaStream_t stream) {
  QG_CHECK(M > 0 && M <= kGemmDecodeMaxM && N > 0 && K > 0 && K % 8 == 0,
           "gemm_f16_layer_norm: M = ", M, " (1 .. ", kGemmDecodeMaxM, "), N = ", N, ", K = ", K,
           " (a positive multiple of 8)");
  QG_CHECK(eps >= 0.0f, "gemm_f16_layer_norm: eps ", eps, " is negative");
  QG_CHECK(x && gamma && beta && normed && w && y,
           "gemm_f16_layer_norm: x, gamma, beta, normed, w and y must be device pointers");
  QG_CHECK(aligned(x, 16) && aligned(gamma, 16) && aligned(beta, 16) && aligned(normed, 16) &&
               aligned(w, 16),
           "gemm_f16_layer_norm: x, gamma, beta, normed and w must be 16-byte aligned");
  const auto overlaps = [](const void* a, std::int64_t a_bytes, const void* b,
                           std::int64_t b_bytes) {
    const auto pa = reinterpret_cast<std::uintptr_t>(a), pb = reinterpret_cast<std::uintptr_t>(b);
    return pa < pb + static_cast<std::uintptr_t>(b_bytes) &&
           pb < pa + static_cast<std::uintptr_t>(a_bytes);
  };
  // Blocks write normed and y while others still read x, w, gamma, beta and the epilogue's
  // operands.
  const std::int64_t normed_bytes = M * K * 2, x_bytes = M * K * 2;
  const std::int64_t y_bytes = M * N * (y_fp32 ? 4 : 2);
  const bool residual = epilogue.kind == GemmEpilogue::Kind::BiasResidual && epilogue.residual;
  constexpr const char* kNormedApart =
      "gemm_f16_layer_norm: normed must not overlap x, w, gamma, beta or the epilogue's operands";
  // (y may still be the residual: each element is read by the thread that writes it.)
  const std::pair<const void*, std::int64_t> shared_inputs[] = {
      {x, x_bytes},
      {w, N * K * 2},
      {gamma, K * 2},
      {beta, K * 2},
      {epilogue.bias, epilogue.bias ? N * 2 : 0}};
  for (const auto& [p, bytes] : shared_inputs) {
    QG_CHECK(!overlaps(normed, normed_bytes, p, bytes), kNormedApart);
    QG_CHECK(!overlaps(y, y_bytes, p, bytes),
             "gemm_f16_layer_norm: y must not overlap x, w, gamma, beta or the bias");
  }
  QG_CHECK(!overlaps(normed, normed_bytes, epilogue.residual, residual ? M * N * 2 : 0),
           kNormedApart);
  QG_CHECK(!overlaps(normed, normed_bytes, y, y_bytes),
           "gemm_f16_layer_norm: y must not overlap normed");
  const tiles::Epilogue e = device_epilogue(epilogue, y, y_fp32, M, N, "gemm_f16_layer_norm");
  launch_gemm_skinny_layer_norm(
      reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(gamma),
      reinterpret_cast<const __half*>(beta), eps, reinterpret_cast<__half*>(normed),
      reinterpret_cast<const __half*>(w), e, K, stream);
}

}  // namespace qg::cuda
