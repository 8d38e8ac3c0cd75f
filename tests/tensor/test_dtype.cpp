// Tests of dtype names and the exact half / bfloat16 <-> float conversions (exhaustive over all
// 16-bit patterns, round-to-nearest-even at every midpoint, subnormals, inf and NaN).
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "catch.hpp"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

using qg::DType;

namespace {
std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
float bits_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
// Independent decoding of binary16 by its definition.
double half_by_definition(std::uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31)
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1024 + mant, exp - 25);
}
}  // namespace

TEST_CASE("dtype names round trip through parse_dtype") {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64, DType::I32,
                  DType::I16, DType::I8, DType::U8, DType::Bool}) {
    CHECK(qg::parse_dtype(qg::dtype_name(t), "test") == t);
  }
  CHECK(qg::dtype_name(DType::Bool) == "BOOL");
  CHECK(qg::dtype_name(DType::BF16) == "BF16");
  REQUIRE_THROWS_AS(qg::parse_dtype("F8_E4M3", "w.safetensors: tensor 'x'"), qg::Error);
  try {
    qg::parse_dtype("float16", "w.safetensors: tensor 'x'");
    FAIL("no error for an unknown dtype");
  } catch (const qg::Error& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("w.safetensors: tensor 'x'") != std::string::npos);
    CHECK(msg.find("float16") != std::string::npos);
  }
}

TEST_CASE("half_to_float matches the binary16 definition for all 65536 patterns") {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = qg::half_to_float(static_cast<std::uint16_t>(h));
    const double expected = half_by_definition(static_cast<std::uint16_t>(h));
    if (std::isnan(expected)) {
      REQUIRE(std::isnan(f));
    } else {
      REQUIRE(static_cast<double>(f) == expected);
      REQUIRE(std::signbit(f) == ((h & 0x8000u) != 0));  // -0 stays -0
    }
  }
}

TEST_CASE("half -> float -> half is the identity for all 65536 patterns, NaN payloads included") {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto back = qg::float_to_half(qg::half_to_float(static_cast<std::uint16_t>(h)));
    REQUIRE(back == h);
  }
}

TEST_CASE("float_to_half rounds to nearest even at every midpoint") {
  for (std::uint16_t h = 0; h < 0x7bff; ++h) {
    const float lo = qg::half_to_float(h), hi = qg::half_to_float(h + 1);
    const float mid = (lo + hi) / 2;  // exact: halves have 11 significant bits, floats 24
    const std::uint16_t even = (h & 1u) ? h + 1 : h;
    REQUIRE(qg::float_to_half(mid) == even);
    REQUIRE(qg::float_to_half(std::nextafter(mid, 0.0f)) == h);
    REQUIRE(qg::float_to_half(std::nextafter(mid, 1e9f)) == h + 1);
    REQUIRE(qg::float_to_half(-mid) == (even | 0x8000u));
  }
  // Between the largest half (65504) and the next step (65536): ties go to even, i.e. inf.
  CHECK(qg::float_to_half(65520.0f) == 0x7c00);
  CHECK(qg::float_to_half(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
  CHECK(qg::float_to_half(1e6f) == 0x7c00);
  CHECK(qg::float_to_half(-1e6f) == 0xfc00);
  CHECK(qg::float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(std::isnan(qg::half_to_float(qg::float_to_half(std::nanf("")))));
}

TEST_CASE("float_to_half subnormals and underflow") {
  const float tiny = std::ldexp(1.0f, -24);  // smallest half subnormal
  CHECK(qg::float_to_half(tiny) == 0x0001);
  CHECK(qg::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);  // tie with 0 -> even (0)
  CHECK(qg::float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(qg::float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // tie 1|2 -> 2
  CHECK(qg::float_to_half(1023 * tiny) == 0x03ff);                // largest subnormal
  CHECK(qg::float_to_half(std::ldexp(1.0f, -14)) == 0x0400);      // smallest normal
  CHECK(qg::float_to_half(std::ldexp(2047.0f, -25)) == 0x0400);   // rounds up into normals
  CHECK(qg::float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(qg::float_to_half(-tiny) == 0x8001);
  CHECK(qg::float_to_half(-0.0f) == 0x8000);
  CHECK(qg::float_to_half(6e-5f) == 0x03ef);  // the fixture's subnormal value
}

TEST_CASE("bfloat16 round trip for all 65536 patterns and nearest-even rounding") {
  for (std::uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = qg::bf16_to_float(static_cast<std::uint16_t>(b));
    REQUIRE(float_bits(f) == b << 16);
    REQUIRE(qg::float_to_bf16(f) == b);
  }
  for (std::uint32_t b = 0; b < 0x7f80; ++b) {  // finite positives; b + 1 may be inf
    const std::uint32_t base = b << 16;
    const std::uint32_t even = (b & 1u) ? b + 1 : b;
    REQUIRE(qg::float_to_bf16(bits_float(base | 0x7fffu)) == b);
    REQUIRE(qg::float_to_bf16(bits_float(base | 0x8000u)) == even);
    REQUIRE(qg::float_to_bf16(bits_float(base | 0x8001u)) == b + 1);
  }
  CHECK(qg::float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to inf
  CHECK(std::isnan(qg::bf16_to_float(qg::float_to_bf16(std::nanf("")))));
  CHECK(qg::float_to_bf16(bits_float(0x7f800001u)) != 0x7f80);  // NaN never becomes inf
}

TEST_CASE("convert_to_f32 handles every floating dtype and rejects the others") {
  float out[3];
  const std::uint16_t halves[3] = {0x3c00, 0xc000, 0x0001};
  qg::convert_to_f32(DType::F16, halves, out, 3);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -2.0f);
  CHECK(out[2] == std::ldexp(1.0f, -24));
  const std::uint16_t bf[3] = {0x3f80, 0xc060, 0x0000};
  qg::convert_to_f32(DType::BF16, bf, out, 3);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -3.5f);
  CHECK(out[2] == 0.0f);
  const double d[3] = {0.25, -1e300, 7.0};
  qg::convert_to_f32(DType::F64, d, out, 3);
  CHECK(out[0] == 0.25f);
  CHECK(std::isinf(out[1]));
  CHECK(out[2] == 7.0f);
  const float f[3] = {1.5f, 2.5f, -0.0f};
  qg::convert_to_f32(DType::F32, f, out, 3);
  CHECK(std::memcmp(out, f, sizeof f) == 0);
  // Unaligned source (a tensor at an odd offset inside a mapped file).
  unsigned char raw[7] = {0, 0x00, 0x3c, 0x00, 0x40, 0, 0};
  qg::convert_to_f32(DType::F16, raw + 1, out, 2);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == 2.0f);
  const std::int64_t ints[1] = {1};
  REQUIRE_THROWS_AS(qg::convert_to_f32(DType::I64, ints, out, 1), qg::Error);
}
