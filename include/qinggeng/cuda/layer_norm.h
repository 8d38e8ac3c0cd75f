// LayerNorm over the rows of an fp16 activation matrix (fp32 statistics), the normalisation
// that opens every GLM layer and closes the model.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief out[r] = (x[r] - mean(x[r])) / sqrt(var(x[r]) + eps) * gamma + beta for every row.
///
/// One thread block per row, two passes over the row (mean, then the variance about it, so
/// large means lose no precision), 16-byte vector accesses when cols % 8 == 0 and every pointer
/// is 16-byte aligned. out may alias x.
/// \param x [rows, cols] fp16;  gamma, beta [cols] fp16;  out [rows, cols] fp16
/// \throws qg::Error for null pointers, non-positive sizes or a negative eps.
void layer_norm(const __half* x, const __half* gamma, const __half* beta, float eps,
                std::int64_t rows, std::int64_t cols, __half* out, cudaStream_t stream);

/// \brief layer_norm that also saves each row's mean and rstd = 1 / sqrt(var + eps) (fp32,
/// [rows] each) for layer_norm_backward. out must not alias x (the backward reads x).
void layer_norm_forward_stats(const __half* x, const __half* gamma, const __half* beta,
                              float eps, std::int64_t rows, std::int64_t cols, __half* out,
                              float* mean, float* rstd, cudaStream_t stream);

/// \brief Backward of layer_norm_forward_stats, one block per row, fp32 inside:
/// dx = rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat)) (overwritten, fp16);
/// dgamma += sum over rows of dy * xhat, dbeta += sum over rows of dy (float [cols], either
/// may be null: frozen norms skip that work). dx may alias dy.
void layer_norm_backward(const __half* x, const __half* gamma, const float* mean,
                         const float* rstd, const __half* dy, std::int64_t rows,
                         std::int64_t cols, __half* dx, float* dgamma, float* dbeta,
                         cudaStream_t stream);

}  // namespace qg::cuda
