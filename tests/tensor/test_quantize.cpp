// Host reference quantizers (qinggeng/tensor/quantize.h): the documented round-trip error
// bound and scale rule for both schemes over rows of very different magnitudes, the byte
// layout (int8 two's complement, int4 nibble order), all-zero blocks, and the errors for
// shapes and values that cannot be quantized.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"
#include "qinggeng/tensor/quantize.h"

using qg::tensor::QuantScheme;

namespace {

/// Rows whose magnitudes span 1e-6 .. 1e3 (row n has its own scale), fp16-representable.
std::vector<float> random_weight(std::int64_t N, std::int64_t K, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<std::size_t>(N * K));
  for (std::int64_t n = 0; n < N; ++n) {
    const float row_scale = std::pow(10.0f, -6.0f + 9.0f * static_cast<float>(n % 10) / 9.0f);
    for (std::int64_t k = 0; k < K; ++k) {
      w[static_cast<std::size_t>(n * K + k)] =
          qg::half_to_float(qg::float_to_half(row_scale * normal(rng)));
    }
  }
  return w;
}

/// Checks the documented bounds of every element and block; returns the elements checked.
std::size_t check_round_trip(const std::vector<float>& w, const qg::tensor::QuantizedMatrix& q) {
  const int qmax = qg::tensor::quant_max(q.scheme);
  const std::int64_t block =
      q.scheme == QuantScheme::Int8PerChannel ? q.K : qg::tensor::kQuantGroup;
  const std::vector<float> dq = qg::tensor::dequantize(q);
  std::size_t checked = 0;
  for (std::int64_t n = 0; n < q.N; ++n) {
    for (std::int64_t k0 = 0; k0 < q.K; k0 += block) {
      float max_abs = 0;
      for (std::int64_t k = k0; k < k0 + block; ++k)
        max_abs = std::max(max_abs, std::fabs(w[static_cast<std::size_t>(n * q.K + k)]));
      const float scale = qg::tensor::quantized_scale(q, n, k0);
      const float ideal = max_abs / static_cast<float>(qmax);
      INFO("row " << n << " block at " << k0 << " max " << max_abs << " scale " << scale);
      REQUIRE(scale >= ideal);
      if (ideal >= 6.2e-5f) REQUIRE(scale <= ideal * (1.0f + 1.0f / 1024));  // normal fp16
      const double bound = scale / 2.0 + qmax * static_cast<double>(scale) * std::ldexp(1.0, -23);
      for (std::int64_t k = k0; k < k0 + block; ++k) {
        const auto at = static_cast<std::size_t>(n * q.K + k);
        const int v = qg::tensor::quantized_value(q, n, k);
        REQUIRE(std::abs(v) <= qmax);
        REQUIRE(std::fabs(static_cast<double>(w[at]) - dq[at]) <= bound);
        ++checked;
      }
    }
  }
  return checked;
}

}  // namespace

TEST_CASE("int8 per-channel round trip stays within scale / 2 per channel", "[quant]") {
  for (std::int64_t K : {1, 7, 64, 1000}) {
    const std::vector<float> w = random_weight(20, K, 11 + static_cast<std::uint32_t>(K));
    const auto q = qg::tensor::quantize(w.data(), 20, K, QuantScheme::Int8PerChannel, "w");
    REQUIRE(q.data.size() == static_cast<std::size_t>(20 * K));
    REQUIRE(q.scales.size() == 20u);
    CHECK(check_round_trip(w, q) == static_cast<std::size_t>(20 * K));
  }
}

TEST_CASE("int4 group-128 round trip stays within scale_g / 2 per group", "[quant]") {
  for (std::int64_t K : {128, 384, 4096}) {
    const std::vector<float> w = random_weight(13, K, 5 + static_cast<std::uint32_t>(K));
    const auto q = qg::tensor::quantize(w.data(), 13, K, QuantScheme::Int4Group128, "w");
    REQUIRE(q.data.size() == static_cast<std::size_t>(13 * K / 2));
    REQUIRE(q.scales.size() == static_cast<std::size_t>(13 * K / 128));
    CHECK(check_round_trip(w, q) == static_cast<std::size_t>(13 * K));
  }
}

TEST_CASE("quantized layouts: int8 two's complement, int4 low nibble first as q + 8",
          "[quant]") {
  // Row max 7 -> scale exactly 1 for int4 (7 / 7) and 7/127 rounded up for int8.
  std::vector<float> w(128, 0.0f);
  w[0] = 7.0f;
  w[1] = -3.0f;
  w[2] = 1.0f;
  w[3] = -7.0f;
  w[4] = 2.5f;  // ties round to even: 2
  w[5] = 3.5f;  // 4
  const auto q4 = qg::tensor::quantize(w.data(), 1, 128, QuantScheme::Int4Group128, "w");
  CHECK(q4.scales[0] == qg::float_to_half(1.0f));
  CHECK(q4.data[0] == ((-3 + 8) << 4 | (7 + 8)));
  CHECK(q4.data[1] == ((-7 + 8) << 4 | (1 + 8)));
  CHECK(q4.data[2] == ((4 + 8) << 4 | (2 + 8)));
  CHECK(q4.data[3] == (8 << 4 | 8));  // zeros
  const auto q8 = qg::tensor::quantize(w.data(), 1, 128, QuantScheme::Int8PerChannel, "w");
  CHECK(q8.data[0] == 127);
  CHECK(q8.data[3] == static_cast<std::uint8_t>(-127));
  CHECK(qg::tensor::quantized_value(q8, 0, 1) == -54);  // -3 / (7/127) = -54.4
}

TEST_CASE("all-zero rows and groups quantize to zero scales and exact zeros", "[quant]") {
  std::vector<float> w = random_weight(3, 256, 9);
  for (std::int64_t k = 0; k < 256; ++k) w[static_cast<std::size_t>(256 + k)] = 0.0f;  // row 1
  for (std::int64_t k = 0; k < 128; ++k) w[static_cast<std::size_t>(512 + k)] = -0.0f;  // group
  for (QuantScheme scheme : {QuantScheme::Int8PerChannel, QuantScheme::Int4Group128}) {
    const auto q = qg::tensor::quantize(w.data(), 3, 256, scheme, "w");
    const std::vector<float> dq = qg::tensor::dequantize(q);
    CHECK(qg::tensor::quantized_scale(q, 1, 0) == 0.0f);
    for (std::int64_t k = 0; k < 256; ++k) {
      CHECK(dq[static_cast<std::size_t>(256 + k)] == 0.0f);
      CHECK(qg::tensor::quantized_value(q, 1, k) == 0);
    }
    if (scheme == QuantScheme::Int4Group128) {
      CHECK(qg::tensor::quantized_scale(q, 2, 0) == 0.0f);
      CHECK(qg::tensor::quantized_scale(q, 2, 128) > 0.0f);
    }
    CHECK(check_round_trip(w, q) == 3u * 256u);
  }
}

TEST_CASE("quantize rejects shapes and values it cannot represent", "[quant]") {
  std::vector<float> w(2 * 200, 0.5f);
  REQUIRE_THROWS_WITH(qg::tensor::quantize(w.data(), 2, 200, QuantScheme::Int4Group128, "dense"),
                      QG_CONTAINS("dense: int4 group-128 quantization needs K (columns) to be a "
                                  "multiple of 128, got K = 200"));
  REQUIRE_THROWS_WITH(qg::tensor::quantize(w.data(), 0, 200, QuantScheme::Int8PerChannel, "qkv"),
                      QG_CONTAINS("qkv: cannot quantize a [0, 200] weight"));
  w[250] = std::nanf("");
  REQUIRE_THROWS_WITH(qg::tensor::quantize(w.data(), 2, 200, QuantScheme::Int8PerChannel, "qkv"),
                      QG_CONTAINS("qkv: non-finite weight nan at row 1, column 50"));
  w[250] = 1e30f;  // finite in fp32, but its scale overflows fp16
  REQUIRE_THROWS_WITH(qg::tensor::quantize(w.data(), 2, 200, QuantScheme::Int8PerChannel, "qkv"),
                      QG_CONTAINS("too large for an fp16 quantization scale"));
  // The largest fp16 weight still quantizes (65504 / 7 is well inside fp16).
  w[250] = 65504.0f;
  const auto q = qg::tensor::quantize(w.data(), 2, 200, QuantScheme::Int8PerChannel, "qkv");
  CHECK(qg::tensor::dequantize(q)[250] == Approx(65504.0f).epsilon(1e-3));
}
