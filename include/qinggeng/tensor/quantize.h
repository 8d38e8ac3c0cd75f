// Weight-only quantization formats and their host reference: a Linear weight W [N, K]
// (N output channels, K inputs) becomes small integers plus fp16 scales, so that ChatGLM-6B
// fits smaller cards and decode (which streams every weight once per token) reads fewer bytes.
// The CUDA quantizer (qinggeng/cuda/quant_gemm.h) produces exactly these bytes.
//
// Both schemes are symmetric (no zero point) and the scale is rounded *up* to fp16, so the
// largest |w| maps to at most qmax and no value is clipped:
//   scale = fp16_round_up(max|w| / qmax),  q = round_half_even(w / scale),  dq = q * scale
// which bounds the round-trip error of every element by
//   |w - dq| <= scale / 2  (+ fp32 rounding of the division and product, <= qmax * scale * 2^-23)
// and scale <= (max|w| / qmax) * (1 + 2^-10) while it is a normal fp16 number.
// A block whose max|w| is 0 gets scale 0 and q = 0 (dequantizes to exact zeros).
//
// Int8PerChannel (qmax 127): one scale per row (output channel).
//   data   int8 [N, K], two's complement, row-major
//   scales fp16 [N]
// Int4Group128 (qmax 7): one scale per row and group of 128 consecutive k; K must be a multiple
// of 128 (no tail rule: ChatGLM-6B's K are 4096 and 16384).
//   data   uint8 [N, K / 2]; byte j of a row holds k = 2j in its low nibble and k = 2j + 1 in
//          its high nibble, each stored as q + 8 (1..15; 0 is never written)
//   scales fp16 [N, K / 128], row-major (scale of row n, group g at n * K / 128 + g)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace qg::tensor {

/// \brief A weight quantization scheme (layouts in the file comment above).
enum class QuantScheme : std::uint8_t { Int8PerChannel, Int4Group128 };

/// \brief Inputs sharing one scale in Int4Group128.
inline constexpr std::int64_t kQuantGroup = 128;

/// \brief Largest |q| of a scheme: 127 (int8) or 7 (int4).
int quant_max(QuantScheme scheme);

/// \brief "int8 per-channel" or "int4 group-128".
std::string_view quant_scheme_name(QuantScheme scheme);

/// \brief Throws qg::Error naming `name` unless an [N, K] weight can use `scheme`
/// (N, K positive; K a multiple of kQuantGroup for Int4Group128).
void check_quant_shape(QuantScheme scheme, std::int64_t N, std::int64_t K, std::string_view name);

/// \brief Bytes of the quantized values of an [N, K] weight (N*K for int8, N*K/2 for int4).
std::size_t quant_data_bytes(QuantScheme scheme, std::int64_t N, std::int64_t K);

/// \brief Number of fp16 scales of an [N, K] weight (N, or N*K/128).
std::size_t quant_scale_count(QuantScheme scheme, std::int64_t N, std::int64_t K);

/// \brief The fp16 scale (bits) of a block whose largest magnitude is `max_abs`:
/// max_abs / qmax rounded up to fp16. Throws qg::Error naming `name` when it is not finite.
std::uint16_t quant_scale(float max_abs, int qmax, std::string_view name);

/// \brief A quantized [N, K] weight in host memory.
struct QuantizedMatrix {
  QuantScheme scheme = QuantScheme::Int8PerChannel;
  std::int64_t N = 0, K = 0;
  std::vector<std::uint8_t> data;     ///< quant_data_bytes(scheme, N, K) bytes
  std::vector<std::uint16_t> scales;  ///< quant_scale_count(scheme, N, K) fp16 bit patterns
};

/// \brief Quantizes the row-major float32 weight `w` [N, K] (the reference the GPU quantizer
/// matches bit for bit when `w` holds fp16 values).
/// \throws qg::Error naming `name` (and the row) for a bad shape or a non-finite weight.
QuantizedMatrix quantize(const float* w, std::int64_t N, std::int64_t K, QuantScheme scheme,
                         std::string_view name);

/// \brief The integer q of element (n, k).
int quantized_value(const QuantizedMatrix& q, std::int64_t n, std::int64_t k);

/// \brief The float32 scale that applies to element (n, k).
float quantized_scale(const QuantizedMatrix& q, std::int64_t n, std::int64_t k);

/// \brief dq = q * scale for every element, row-major [N, K] float32.
std::vector<float> dequantize(const QuantizedMatrix& q);

}  // namespace qg::tensor
