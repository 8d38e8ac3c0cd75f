// Names of the element types (safetensors spelling) and bulk conversion of stored floating
// tensors to float32 for the CPU reference backend.
#include "qinggeng/tensor/dtype.h"

#include <array>
#include <utility>

#include "qinggeng/error.h"

namespace qg {

namespace {
constexpr std::array<std::pair<DType, std::string_view>, 10> kNames{{
    {DType::F64, "F64"},
    {DType::F32, "F32"},
    {DType::F16, "F16"},
    {DType::BF16, "BF16"},
    {DType::I64, "I64"},
    {DType::I32, "I32"},
    {DType::I16, "I16"},
    {DType::I8, "I8"},
    {DType::U8, "U8"},
    {DType::Bool, "BOOL"},
}};

// Reads element i of a 16-bit array without assuming alignment (mapped tensors may sit at any
// offset inside a checkpoint).
inline std::uint16_t load_u16(const void* src, std::size_t i) {
  std::uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(src) + i * sizeof v, sizeof v);
  return v;
}
}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& [type, name] : kNames) {
    if (type == t) return name;
  }
  return "?";
}

DType parse_dtype(std::string_view name, std::string_view context) {
  for (const auto& [type, spelled] : kNames) {
    if (spelled == name) return type;
  }
  fail(context, ": unknown dtype \"", name, "\" (expected one of F64 F32 F16 BF16 I64 I32 ",
       "I16 I8 U8 BOOL)");
}

void convert_to_f32(DType src_type, const void* src, float* dst, std::size_t count) {
  switch (src_type) {
    case DType::F32:
      if (count != 0) std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) dst[i] = half_to_float(load_u16(src, i));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) dst[i] = bf16_to_float(load_u16(src, i));
      return;
    case DType::F64:
      for (std::size_t i = 0; i < count; ++i) {
        double v;
        std::memcpy(&v, static_cast<const unsigned char*>(src) + i * sizeof v, sizeof v);
        dst[i] = static_cast<float>(v);
      }
      return;
    default: fail("cannot convert ", dtype_name(src_type), " to F32: not a floating dtype");
  }
}

}  // namespace qg
