// Host reference of the weight quantization formats in qinggeng/tensor/quantize.h. Written
// for clarity, not speed: it defines the bytes that the CUDA quantizer must reproduce.
#include "qinggeng/tensor/quantize.h"

#include <algorithm>
#include <cmath>

#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::tensor {

int quant_max(QuantScheme scheme) { return scheme == QuantScheme::Int8PerChannel ? 127 : 7; }

std::string_view quant_scheme_name(QuantScheme scheme) {
  return scheme == QuantScheme::Int8PerChannel ? "int8 per-channel" : "int4 group-128";
}

void check_quant_shape(QuantScheme scheme, std::int64_t N, std::int64_t K,
                       std::string_view name) {
  QG_CHECK(N > 0 && K > 0, name, ": cannot quantize a [", N, ", ", K, "] weight (", 
           quant_scheme_name(scheme), "): sizes must be positive");
  QG_CHECK(scheme != QuantScheme::Int4Group128 || K % kQuantGroup == 0, name,
           ": int4 group-128 quantization needs K (columns) to be a multiple of ", kQuantGroup,
           ", got K = ", K);
}

std::size_t quant_data_bytes(QuantScheme scheme, std::int64_t N, std::int64_t K) {
  const auto n = static_cast<std::size_t>(N * K);
  return scheme == QuantScheme::Int8PerChannel ? n : n / 2;
}

std::size_t quant_scale_count(QuantScheme scheme, std::int64_t N, std::int64_t K) {
  return static_cast<std::size_t>(scheme == QuantScheme::Int8PerChannel ? N
                                                                         : N * (K / kQuantGroup));
}

std::uint16_t quant_scale(float max_abs, int qmax, std::string_view name) {
  const float ideal = max_abs / static_cast<float>(qmax);
  std::uint16_t h = float_to_half(ideal);
  // Round up instead of to nearest: then max_abs / scale <= qmax and nothing is clipped.
  if (half_to_float(h) < ideal) ++h;
  QG_CHECK(std::isfinite(half_to_float(h)), name, ": weight magnitude ", max_abs,
           " is too large for an fp16 quantization scale");
  return h;
}

namespace {

/// q of w in a block with fp16 scale bits `scale` (0 for an all-zero block).
int quantize_value(float w, float scale) {
  if (scale == 0.0f) return 0;
  return static_cast<int>(std::nearbyint(w / scale));  // round half to even
}

}  // namespace

QuantizedMatrix quantize(const float* w, std::int64_t N, std::int64_t K, QuantScheme scheme,
                         std::string_view name) {
  check_quant_shape(scheme, N, K, name);
  QuantizedMatrix q;
  q.scheme = scheme;
  q.N = N;
  q.K = K;
  q.data.assign(quant_data_bytes(scheme, N, K), 0);
  q.scales.assign(quant_scale_count(scheme, N, K), 0);
  const int qmax = quant_max(scheme);
  const std::int64_t block = scheme == QuantScheme::Int8PerChannel ? K : kQuantGroup;
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t k0 = 0; k0 < K; k0 += block) {
      const float* src = w + n * K + k0;
      float max_abs = 0.0f;
      for (std::int64_t k = 0; k < block; ++k) {
        QG_CHECK(std::isfinite(src[k]), name, ": non-finite weight ", src[k], " at row ", n,
                 ", column ", k0 + k, " cannot be quantized");
        max_abs = std::max(max_abs, std::fabs(src[k]));
      }
      const std::uint16_t scale_bits = quant_scale(max_abs, qmax, name);
      q.scales[static_cast<std::size_t>((n * K + k0) / block)] = scale_bits;
      const float scale = half_to_float(scale_bits);
      for (std::int64_t k = 0; k < block; ++k) {
        const int v = quantize_value(src[k], scale);
        const auto at = static_cast<std::size_t>(n * K + k0 + k);
        if (scheme == QuantScheme::Int8PerChannel) {
          q.data[at] = static_cast<std::uint8_t>(static_cast<std::int8_t>(v));
        } else {
          const int shift = (at % 2) * 4;
          q.data[at / 2] = static_cast<std::uint8_t>(q.data[at / 2] | ((v + 8) << shift));
        }
      }
    }
  }
  return q;
}

int quantized_value(const QuantizedMatrix& q, std::int64_t n, std::int64_t k) {
  const auto at = static_cast<std::size_t>(n * q.K + k);
  if (q.scheme == QuantScheme::Int8PerChannel) return static_cast<std::int8_t>(q.data[at]);
  return ((q.data[at / 2] >> ((at % 2) * 4)) & 0xf) - 8;
}

float quantized_scale(const QuantizedMatrix& q, std::int64_t n, std::int64_t k) {
  const std::int64_t at =
      q.scheme == QuantScheme::Int8PerChannel ? n : n * (q.K / kQuantGroup) + k / kQuantGroup;
  return half_to_float(q.scales[static_cast<std::size_t>(at)]);
}

std::vector<float> dequantize(const QuantizedMatrix& q) {
  std::vector<float> out(static_cast<std::size_t>(q.N * q.K));
  for (std::int64_t n = 0; n < q.N; ++n) {
    for (std::int64_t k = 0; k < q.K; ++k) {
      out[static_cast<std::size_t>(n * q.K + k)] =
          static_cast<float>(quantized_value(q, n, k)) * quantized_scale(q, n, k);
    }
  }
  return out;
}

}  // namespace qg::tensor
