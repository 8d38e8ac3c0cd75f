// NumPy .npy reading and writing for float32 arrays (see npy.h). Format: "\x93NUMPY", major and
// minor version bytes, header length (u16 in v1, u32 in v2/v3), a Python dict literal
// {'descr': '<f4', 'fortran_order': False, 'shape': (a, b), } padded with spaces and '\n'.
#include "qinggeng/io/npy.h"

#include <cctype>
#include <cstring>
#include <string>
#include <string_view>

#include "io/atomic_file.h"
#include "io/byte_reader.h"
#include "io/checkpoint_formats.h"
#include "io/mapped_file.h"
#include "qinggeng/error.h"

namespace qg::io {

namespace {

constexpr std::string_view kMagic = "\x93NUMPY";

// The text following `'key':` in the header dict, with leading spaces skipped.
std::string_view dict_value(std::string_view header, std::string_view key,
                            const std::string& origin) {
  const std::string quoted = "'" + std::string(key) + "'";
  std::size_t pos = header.find(quoted);
  QG_CHECK(pos != std::string_view::npos, origin, ": .npy header has no '", key, "' entry");
  pos = header.find(':', pos + quoted.size());
  QG_CHECK(pos != std::string_view::npos, origin, ": malformed .npy header entry '", key, "'");
  std::string_view rest = header.substr(pos + 1);
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  return rest;
}

std::vector<std::int64_t> parse_shape(std::string_view text, const std::string& origin) {
  QG_CHECK(!text.empty() && text.front() == '(', origin, ": .npy 'shape' must be a tuple");
  const std::size_t close = text.find(')');
  QG_CHECK(close != std::string_view::npos, origin, ": .npy 'shape' tuple is not closed");
  std::vector<std::int64_t> shape;
  std::size_t i = 1;
  while (i < close) {
    while (i < close && (text[i] == ' ' || text[i] == ',')) ++i;
    if (i == close) break;
    QG_CHECK(std::isdigit(static_cast<unsigned char>(text[i])), origin,
             ": .npy 'shape' holds a non-integer");
    std::int64_t d = 0;
    while (i < close && std::isdigit(static_cast<unsigned char>(text[i]))) {
      QG_CHECK(d < (std::int64_t{1} << 56), origin, ": .npy dimension too large");
      d = d * 10 + (text[i++] - '0');
    }
    shape.push_back(d);
  }
  return shape;
}

}  // namespace

void write_npy_f32(const std::filesystem::path& path, const float* data,
                   const std::vector<std::int64_t>& shape) {
  const std::size_t numel = checked_numel(shape, path.string());
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  const std::size_t prefix = kMagic.size() + 2 + 2;  // magic, version, u16 length
  const std::size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict += '\n';
  QG_CHECK(dict.size() <= 0xffff, path.string(), ": .npy header too long");

  AtomicFileWriter out(path);
  out.write(kMagic);
  const unsigned char version_and_len[4] = {1, 0, static_cast<unsigned char>(dict.size() & 0xff),
                                            static_cast<unsigned char>(dict.size() >> 8)};
  out.write(version_and_len, sizeof version_and_len);
  out.write(dict);
  out.write(data, numel * sizeof(float));
  out.commit();
}

NpyArray read_npy_f32(const std::filesystem::path& path) {
  const MappedFile file = MappedFile::open(path);
  const std::string origin = file.name();
  ByteReader in(file.data(), file.size(), origin);
  QG_CHECK(file.size() >= kMagic.size() && in.take_string(kMagic.size()) == kMagic, origin,
           ": not a .npy file (bad magic)");
  const std::uint8_t major = in.u8();
  in.skip(1);  // minor version
  QG_CHECK(major >= 1 && major <= 3, origin, ": unsupported .npy format version ", int{major});
  const std::uint32_t header_len = major == 1 ? in.u16() : in.u32();
  const std::string_view header = in.take_string(header_len);

  const std::string_view descr = dict_value(header, "descr", origin);
  QG_CHECK(descr.substr(0, 5) == "'<f4'", origin, ": .npy dtype is ",
           descr.substr(0, descr.find(',')), ", expected '<f4' (little-endian float32)");
  const std::string_view order = dict_value(header, "fortran_order", origin);
  QG_CHECK(order.substr(0, 5) == "False", origin,
           ": .npy array is in Fortran order; only C order is supported");

  NpyArray out;
  out.shape = parse_shape(dict_value(header, "shape", origin), origin);
  const std::size_t numel = checked_numel(out.shape, origin);
  QG_CHECK(in.remaining() == numel * sizeof(float), origin, ": .npy data holds ", in.remaining(),
           " bytes but its shape needs ", numel * sizeof(float));
  out.data.resize(numel);
  if (numel != 0)
    std::memcpy(out.data.data(), in.take(numel * sizeof(float)), numel * sizeof(float));
  return out;
}

}  // namespace qg::io
