// fp16 tensor-core GEMMs of the training backward, the two products gemm_f16 (gemm.h) does not
// cover because an operand is read "the other way round":
//
//   gemm_f16_nn  dX = dY · W      Y[M, N] = X[M, K] · W[K, N]    (W row-major [K, N])
//   gemm_f16_tn  dW = dY^T · X    Y[M, N] = A[K, M]^T · B[K, N]  (A, B row-major, K rows)
//
// A Linear weight is [out, in]; its input gradient is dX[T, in] = dY[T, out] · W[out, in], so
// gemm_f16_nn reads W with K = out and N = in, and no transposed copy of the weights is ever
// made. Its weight gradient (full-parameter training only) is dW[out, in] = dY^T X, the sum
// over tokens that gemm_f16_tn forms into fp32. Both run block-tiled mma.sync pipelines
// (sm_80 and newer) with ldmatrix.trans fragment loads; fp32 accumulation throughout.
// Pointers are fp16 bit patterns (uint16_t) so this header does not need cuda_fp16.h.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief What is added to acc = (X W)[m, n] before gemm_f16_nn stores it.
struct GemmNnEpilogue {
  /// If set, y = residual[m, n] * alpha + acc: the two branches of GLM's residual
  /// (h = a * alpha + f(a)) meet in one store in the backward. fp16 [M, N]; may alias y.
  const std::uint16_t* residual = nullptr;
  float alpha = 1.0f;
  /// fp32 output only: y += (result) instead of y = (result) (accumulation over chunks).
  bool accumulate = false;
};

/// \brief Y[M, N] = epilogue(X[M, K] · W[K, N]), fp32 accumulation, on `stream`.
/// \param x fp16 [M, K] row-major, 16-byte aligned
/// \param w fp16 [K, N] row-major, 16-byte aligned
/// \param y [M, N] row-major: fp16 when `y_fp32` is false, else float; must not overlap x, w
/// \param K, N positive multiples of 8; M any positive size
/// \throws qg::Error for bad sizes, misaligned or missing pointers, accumulate with fp16 y,
/// or a failed launch.
void gemm_f16_nn(const std::uint16_t* x, const std::uint16_t* w, void* y, bool y_fp32,
                 std::int64_t M, std::int64_t N, std::int64_t K, const GemmNnEpilogue& epilogue,
                 cudaStream_t stream);

/// \brief Y[M, N] (+)= A[K, M]^T · B[K, N] in fp32, on `stream`.
/// \param a fp16 [K, M] row-major (dY: K = tokens, M = out features), 16-byte aligned
/// \param b fp16 [K, N] row-major (X: K = tokens, N = in features), 16-byte aligned
/// \param y float [M, N] row-major; overwritten, or added to when `accumulate`
/// \param M, N positive multiples of 8; K any positive size
/// \throws qg::Error for bad sizes, misaligned or missing pointers, or a failed launch.
void gemm_f16_tn(const std::uint16_t* a, const std::uint16_t* b, float* y, bool accumulate,
                 std::int64_t M, std::int64_t N, std::int64_t K, cudaStream_t stream);

}  // namespace qg::cuda
