// fp16 tensor-core GEMM of the CUDA backend: Y[M, N] = X[M, K] · W[N, K]^T with fp32
// accumulation and a fused epilogue (bias, gelu, GLM residual), fp16 or fp32 output.
// W is a PyTorch Linear weight ([out_features, in_features], row-major); X and Y are row-major
// activations. Large M runs a multi-stage tile pipeline: TMA + wgmma on H100/H200, cp.async +
// mma.sync elsewhere. M <= 16 (decode; up to 64 on narrow layers) runs a skinny path that
// streams each weight once for all tokens.
// Pointers are fp16 bit patterns (uint16_t) so this header does not need cuda_fp16.h.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief A narrow second product accumulated with the first: acc = X W^T + U V^T, with
/// U [M, rank] and V [N, rank] fp16 row-major, rank a positive multiple of 8, both 16-byte
/// aligned. The tile kernels run it as rank / BK more K slices of the same pipeline, so it is
/// rounded to fp16 once, with the rest of acc. This is the LoRA forward term of training:
/// U = dropout(x) A^T and V = scale * B (lora_train.h). Not on the skinny path: a call with a
/// low-rank term runs a tile kernel at every M.
struct GemmLowRank {
  const std::uint16_t* u = nullptr;  ///< [M, rank] fp16, or null for none
  const std::uint16_t* v = nullptr;  ///< [N, rank] fp16
  std::int64_t rank = 0;
};

/// \brief What happens to acc = (X W^T)[m, n] before it is stored.
struct GemmEpilogue {
  enum class Kind {
    None,          ///< y = acc
    Bias,          ///< y = acc + bias[n]
    BiasGelu,      ///< y = gelu_tanh(acc + bias[n])
    BiasResidual,  ///< y = residual[m, n] * alpha + (acc + bias[n])  (GLM's residual)
  };
  Kind kind = Kind::None;
  const std::uint16_t* bias = nullptr;      ///< [N] fp16; required by every kind but None
  const std::uint16_t* residual = nullptr;  ///< [M, N] fp16 row-major; may alias an fp16 y
  float alpha = 1.0f;                       ///< residual scale (BiasResidual only)
};

/// \brief Which kernel family runs; Auto is what callers want (tests and benches force one).
enum class GemmPath {
  Auto,    ///< skinny for M <= 16 (and up to 64 when tiles would leave SMs idle), else the
           ///< cheapest tile shape of the families this GPU runs
  Tiled,   ///< block-tiled mma.sync pipeline (any M, every supported GPU)
  Wgmma,   ///< block-tiled wgmma pipeline (any M; H100/H200 with a build that has sm_90a)
  Skinny,  ///< weight-streaming decode kernel (M <= kGemmSkinnyMaxM)
};

/// \brief Largest M the skinny (decode) path accepts.
inline constexpr std::int64_t kGemmSkinnyMaxM = 64;
/// \brief Auto always takes the skinny path up to this M (decode batches).
inline constexpr std::int64_t kGemmDecodeMaxM = 16;

/// \brief "skinny", "wgmma 128x256", "mma.sync 128x128", ...: the kernel and tile shape
/// gemm_f16 runs for this size with GemmPath::Auto on the current device (for benchmarks).
std::string gemm_plan(std::int64_t M, std::int64_t N);

/// \brief Y[M, N] = epilogue(X[M, K] · W[N, K]^T), fp32 accumulation, on `stream`.
///
/// \param x fp16 [M, K] row-major, 16-byte aligned
/// \param w fp16 [N, K] row-major (Linear weight layout), 16-byte aligned
/// \param y [M, N] row-major output: fp16 when `y_fp32` is false, else float; 4-byte aligned;
///        must not overlap x or w
/// \param K must be a positive multiple of 8 (rows of x and w stay 16-byte aligned);
///        M and N may be any positive sizes
/// \throws qg::Error for bad sizes, misaligned or missing pointers, a path this GPU cannot
/// run, or a failed launch. The first call on a device runs a one-off synchronous probe, so
/// make it before capturing a CUDA graph.
void gemm_f16(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32,
              std::int64_t M, std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
              cudaStream_t stream, GemmPath path = GemmPath::Auto);

/// \brief The input LayerNorm of a decode-sized product fused into it: normed = LayerNorm(x) *
/// gamma + beta over each row of x, and Y = epilogue(normed W^T), in one launch (each block
/// takes the rows' statistics itself and normalises X as it streams W). The same bits as
/// layer_norm(x, gamma, beta, eps, M, K, normed) (cuda/layer_norm.h) followed by gemm_f16 on
/// the skinny path.
/// \param x, gamma, beta, normed, w fp16, 16-byte aligned; x [M, K], gamma and beta [K],
///        normed [M, K]; normed overlaps no other operand, and y does not overlap x (the
///        epilogue's residual may alias an fp16 y, as in gemm_f16)
/// \param M 1 .. kGemmDecodeMaxM; K a positive multiple of 8
/// \throws qg::Error for bad sizes, misaligned or missing pointers, or a failed launch.
void gemm_f16_layer_norm(const std::uint16_t* x, const std::uint16_t* gamma,
                         const std::uint16_t* beta, float eps, std::uint16_t* normed,
                         const std::uint16_t* w, void* y, bool y_fp32, std::int64_t M,
                         std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
                         cudaStream_t stream);

/// \brief Y[M, N] = epilogue(X[M, K] · W[N, K]^T + U V^T): gemm_f16 with a low-rank term
/// (see GemmLowRank; a term with null u adds nothing). GemmPath::Skinny is rejected.
void gemm_f16(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32, std::int64_t M,
              std::int64_t N, std::int64_t K, const GemmEpilogue& epilogue,
              const GemmLowRank& low_rank, cudaStream_t stream, GemmPath path = GemmPath::Auto);

}  // namespace qg::cuda
