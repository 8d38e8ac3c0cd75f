// The central directory of a ZIP archive held in memory, as torch.save writes it: entries
// stored uncompressed (so their bytes can be used in place), with ZIP64 records for archives
// or entries past 4 GiB. Compressed or encrypted entries are rejected with a clear error.
// Internal to the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qg::io {

/// Index of the entries of a stored-only ZIP archive occupying [data, data + size).
class ZipArchive {
 public:
  struct Entry {
    std::string name;
    std::uint64_t offset = 0;  ///< of the entry's bytes, from the start of the archive
    std::uint64_t size = 0;    ///< entry bytes (stored: compressed == uncompressed)
  };

  /// Parses the end-of-central-directory record (ZIP64 when present), the central directory
  /// and each entry's local header. `origin` names the archive in errors. Throws qg::Error on
  /// anything truncated, inconsistent, compressed or encrypted.
  ZipArchive(const std::byte* data, std::size_t size, std::string origin);

  const std::vector<Entry>& entries() const { return entries_; }
  /// The entry called `name`, or nullptr.
  const Entry* find(std::string_view name) const;
  /// First byte of `entry` (valid while the archive memory lives).
  const std::byte* bytes(const Entry& entry) const { return data_ + entry.offset; }

 private:
  const std::byte* data_;
  std::size_t size_;
  std::string origin_;
  std::vector<Entry> entries_;
};

}  // namespace qg::io
