// qg::cuda::gemm_f16: argument checks and the choice between the tiled and the skinny GEMM
// (see include/qinggeng/cuda/gemm.h). Every check names the offending argument.
#include <cstdint>

#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "qinggeng/cuda/gemm.h"

namespace qg::cuda {
namespace {

bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace

void gemm_f16(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32,
              std::int64_t M, std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
              cudaStream_t stream, GemmPath path) {
  QG_CHECK(M >= 0 && N > 0 && K > 0, "gemm_f16: sizes must be positive (M = ", M, ", N = ", N,
           ", K = ", K, ")");
  QG_CHECK(K % 8 == 0, "gemm_f16: K = ", K, " must be a multiple of 8");
  QG_CHECK(path != GemmPath::Skinny || M <= kGemmSkinnyMaxM, "gemm_f16: the skinny path takes M <= ",
           kGemmSkinnyMaxM, ", got M = ", M);
  if (M == 0) return;
  QG_CHECK(x && w && y, "gemm_f16: x, w and y must be device pointers (got a null pointer)");
  QG_CHECK(aligned(x, 16) && aligned(w, 16), "gemm_f16: x and w must be 16-byte aligned");
  QG_CHECK(aligned(y, y_fp32 ? 8 : 4), "gemm_f16: y must be ", y_fp32 ? 8 : 4, "-byte aligned");
  const bool has_bias = epilogue.kind != GemmEpilogue::Kind::None;
  QG_CHECK(!has_bias || epilogue.bias, "gemm_f16: this epilogue needs a bias pointer");
  const bool has_residual = epilogue.kind == GemmEpilogue::Kind::BiasResidual;
  QG_CHECK(!has_residual || (epilogue.residual && aligned(epilogue.residual, 4)),
           "gemm_f16: the residual epilogue needs a 4-byte aligned residual pointer");

  tiles::Epilogue e;
  e.kind = static_cast<int>(epilogue.kind);
  e.bias = has_bias ? reinterpret_cast<const __half*>(epilogue.bias) : nullptr;
  e.residual = has_residual ? reinterpret_cast<const __half*>(epilogue.residual) : nullptr;
  e.alpha = epilogue.alpha;
  e.y = y;
  e.y_fp32 = y_fp32;
  e.M = M;
  e.N = N;
  const auto* xh = reinterpret_cast<const __half*>(x);
  const auto* wh = reinterpret_cast<const __half*>(w);
  const bool skinny = path == GemmPath::Skinny || (path == GemmPath::Auto && M <= kGemmSkinnyMaxM);
  if (skinny) {
    launch_gemm_skinny(xh, wh, e, K, stream);
  } else {
    launch_gemm_tiled(xh, wh, e, K, stream);
  }
}

}  // namespace qg::cuda
