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

}  // namespace qg::cuda
