// A whole file mapped read-only into memory (POSIX mmap), so checkpoint tensors can be used in
// place without copying. Internal to the library.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace qg::io {

/// A read-only memory mapping of one file; unmapped on destruction. Movable, not copyable.
class MappedFile {
 public:
  /// Maps `path`. Throws qg::Error naming the path when it is missing, a directory, or cannot
  /// be opened or mapped. An empty file gives size() == 0 and data() == nullptr.
  static MappedFile open(const std::filesystem::path& path);

  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }
  /// The path as a string, for error messages.
  std::string name() const { return path_.string(); }

 private:
  MappedFile() = default;
  void release() noexcept;

  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace qg::io
