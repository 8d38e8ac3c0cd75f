// Element-type conversion kernels (float32 <-> fp16) used when weights and activations cross
// between host float32 and the fp16 CUDA backend. Rounding matches qg::float_to_half exactly.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief dst[i] = fp16 bits of src[i] (round to nearest even), on `stream`.
void f32_to_f16(const float* src, std::uint16_t* dst, std::size_t n, cudaStream_t stream);
/// \brief dst[i] = float value of fp16 bits src[i], on `stream`.
void f16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, cudaStream_t stream);

}  // namespace qg::cuda
