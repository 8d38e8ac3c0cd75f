// Element types that appear in checkpoints and on the compute backends, plus exact scalar
// conversions between IEEE half, bfloat16 and float (the CPU reference converts every stored
// weight to float32 at load time with these).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace qg {

/// \brief Element type of a stored or computed tensor.
enum class DType : std::uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U8, Bool };

/// \brief Size of one element in bytes.
constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
    case DType::I64: return 8;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16: return 2;
    case DType::I8:
    case DType::U8:
    case DType::Bool: return 1;
  }
  return 0;
}

/// \brief The safetensors spelling of a dtype ("F32", "F16", "BF16", ...).
std::string_view dtype_name(DType t);

/// \brief Parses a safetensors dtype string; throws qg::Error naming `context` if unknown.
DType parse_dtype(std::string_view name, std::string_view context);

/// \brief True for F32, F16, BF16 and F64.
constexpr bool is_floating(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

/// \brief IEEE binary16 bits -> float (exact, handles subnormals, inf and NaN).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// \brief float -> IEEE binary16 bits, round to nearest even (overflow gives inf; a NaN stays
/// NaN, keeping its top payload bits, so half -> float -> half is the identity).
inline std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN; a NaN keeps its top payload bits (quiet if none)
    if (abs == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
    const std::uint32_t payload = (abs >> 13) & 0x3ffu;
    return static_cast<std::uint16_t>(sign | 0x7c00u | (payload != 0 ? payload : 0x200u));
  }
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
    const std::uint32_t e = abs >> 23;
    const std::uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14..24: units of the smallest subnormal, 2^-24
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    std::uint32_t q = m >> shift;
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  std::uint32_t bits = abs - 0x38000000u;  // rebias exponent 127 -> 15 (in place)
  const std::uint32_t rem = bits & 0x1fffu;
  bits >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (bits & 1u))) ++bits;
  return static_cast<std::uint16_t>(sign | bits);
}

/// \brief bfloat16 bits -> float (exact).
inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// \brief float -> bfloat16 bits, round to nearest even (NaN stays NaN, keeping its top
/// payload bits).
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    const auto top = static_cast<std::uint16_t>(x >> 16);
    return (top & 0x7fu) != 0 ? top : static_cast<std::uint16_t>(top | 0x40u);
  }
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

/// \brief Converts `count` elements of a floating dtype at `src` to float32 at `dst`.
/// Throws qg::Error for non-floating dtypes.
void convert_to_f32(DType src_type, const void* src, float* dst, std::size_t count);

}  // namespace qg
