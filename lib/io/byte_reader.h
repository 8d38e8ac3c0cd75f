// Bounds-checked little-endian reading of a byte range (ZIP records, pickle streams, .npy
// headers). Every read past the end throws qg::Error naming the source, so corrupt or
// truncated files can never cause an out-of-bounds access. Internal to the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>

#include "qinggeng/error.h"

namespace qg::io {

/// A cursor over [data, data + size) that refuses to step outside it.
class ByteReader {
 public:
  /// `origin` names the data in error messages ("model.bin: data.pkl").
  ByteReader(const std::byte* data, std::size_t size, std::string origin)
      : data_(data), size_(size), origin_(std::move(origin)) {}

  std::size_t size() const { return size_; }
  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return size_ - pos_; }
  bool at_end() const { return pos_ == size_; }
  const std::string& origin() const { return origin_; }

  /// Moves to absolute offset `pos` (which may equal size()).
  void seek(std::uint64_t pos) {
    QG_CHECK(pos <= size_, origin_, ": offset ", pos, " is past the end (size ", size_, ")");
    pos_ = static_cast<std::size_t>(pos);
  }
  void skip(std::uint64_t n) { take(n); }

  /// The next `n` bytes (the cursor moves past them).
  const std::byte* take(std::uint64_t n) {
    QG_CHECK(n <= remaining(), origin_, ": unexpected end of data at offset ", pos_, " (need ", n,
             " bytes, ", remaining(), " left)");
    const std::byte* p = data_ + pos_;
    pos_ += static_cast<std::size_t>(n);
    return p;
  }
  std::string_view take_string(std::uint64_t n) {
    const std::byte* p = take(n);
    return {reinterpret_cast<const char*>(p), static_cast<std::size_t>(n)};
  }

  std::uint8_t u8() { return static_cast<std::uint8_t>(*take(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(le(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(le(4)); }
  std::uint64_t u64() { return le(8); }

 private:
  std::uint64_t le(std::size_t n) {
    const std::byte* p = take(n);
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    return v;
  }

  const std::byte* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::string origin_;
};

}  // namespace qg::io
