// Weight-only quantized GEMM of the CUDA backend: Linear weights stored as int8 (per output
// channel) or int4 (groups of 128 inputs) with fp16 scales, in the layouts of
// qinggeng/tensor/quantize.h, quantized on the device at load time, and
//   Y[M, N] = epilogue(X[M, K] · dequant(Wq)[N, K]^T)
// with fp16 activations, fp32 accumulation and gemm_f16's epilogues.
// Decode (M <= kQuantDecodeMaxM) streams each quantized weight once for all M tokens and
// dequantizes in registers: about 2x (int8) and 3.5x (int4) fewer bytes than fp16.
// Larger M (prefill) dequantizes the weight into a caller-provided fp16 scratch [N, K] and runs
// gemm_f16: correct everywhere, as fast as fp16 prefill plus one dequantize pass.
// Pointers are raw device pointers; fp16 values are uint16_t bit patterns.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "qinggeng/cuda/gemm.h"
#include "qinggeng/tensor/quantize.h"

namespace qg::cuda {

/// \brief A quantized Linear weight [N, K] in device memory (not owned).
struct QuantizedWeight {
  using Scheme = tensor::QuantScheme;  ///< Int8PerChannel or Int4Group128
  Scheme scheme = Scheme::Int8PerChannel;
  const void* data = nullptr;    ///< tensor::quant_data_bytes(scheme, N, K) bytes, 16-byte aligned
  const void* scales = nullptr;  ///< tensor::quant_scale_count(scheme, N, K) fp16, 2-byte aligned
  std::int64_t N = 0, K = 0;
};

/// \brief Largest M that quant_gemm runs on the weight-streaming decode kernel.
inline constexpr std::int64_t kQuantDecodeMaxM = 16;

/// \brief Quantizes the fp16 weight `w` [N, K] on the device into `data` and `scales`
/// (sizes from tensor::quant_data_bytes / quant_scale_count), equal bit for bit to
/// tensor::quantize of the same values, and returns the view of the result.
///
/// \param K a multiple of 16 (Int8PerChannel) or 128 (Int4Group128)
/// \param name the weight's name, used in error messages
/// \throws qg::Error for a bad shape, null or misaligned pointers (w, data: 16 bytes), or a
/// weight that is not finite (found on the device: this call synchronizes `stream`, it is a
/// load-time operation).
QuantizedWeight quantize_weight(const std::uint16_t* w, QuantizedWeight::Scheme scheme,
                                std::int64_t N, std::int64_t K, void* data,
                                std::uint16_t* scales, const char* name, cudaStream_t stream);

/// \brief Writes fp16(q * scale) of every element of `qw` to `w` [N, K] (16-byte aligned), on
/// `stream`: the weight the prefill path multiplies with.
void dequantize_weight(const QuantizedWeight& qw, std::uint16_t* w, cudaStream_t stream);

/// \brief Y[M, N] = epilogue(X[M, K] · dequant(qw)^T), fp32 accumulation, on `stream`.
///
/// \param x fp16 [M, K] row-major, 16-byte aligned
/// \param qw the weight ([N, K] = [qw.N, qw.K]); K a multiple of 16 (int8) or 128 (int4)
/// \param y [M, N] row-major: fp16 when `y_fp32` is false, else float; must not overlap x
/// \param epilogue as gemm_f16 (the residual may alias an fp16 y)
/// \param scratch fp16 [N, K], 16-byte aligned; needed only when M > kQuantDecodeMaxM
/// \throws qg::Error for bad sizes, missing or misaligned pointers, M > kQuantDecodeMaxM
/// without scratch, or a failed launch.
void quant_gemm(const std::uint16_t* x, const QuantizedWeight& qw, void* y, bool y_fp32,
                std::int64_t M, const GemmEpilogue& epilogue, cudaStream_t stream,
                std::uint16_t* scratch = nullptr);

}  // namespace qg::cuda
