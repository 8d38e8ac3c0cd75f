// Internal glue between the quantized-weight files: quantize.cu (format conversions) and
// quant_gemm.cu (the GEMM) share the device-side shape rule.
#pragma once

#include <cstdint>

#include "qinggeng/tensor/quantize.h"

namespace qg::cuda {

/// \brief tensor::check_quant_shape plus the GPU kernels' rule K % 16 == 0 (16-byte rows of
/// int8); throws qg::Error naming `name`.
void check_device_quant_shape(tensor::QuantScheme scheme, std::int64_t N, std::int64_t K,
                              const char* name);

}  // namespace qg::cuda
