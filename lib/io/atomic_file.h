// Write-then-rename output files: readers never see a half-written checkpoint or array, and a
// crash leaves at most a stray "<name>.tmp.<pid>" next to the target. Internal to the library.
#pragma once

#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <string_view>

namespace qg::io {

/// Writes into a temporary file beside `target`; commit() renames it into place. Destroying an
/// uncommitted writer removes the temporary file. Errors throw qg::Error naming the target.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path target);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  void write(const void* data, std::size_t n);
  void write(std::string_view text) { write(text.data(), text.size()); }
  /// Flushes, closes and renames the temporary file to the target.
  void commit();

 private:
  std::filesystem::path target_;
  std::filesystem::path tmp_;
  std::FILE* file_ = nullptr;
};

/// Writes `content` to `target` atomically.
void write_file_atomic(const std::filesystem::path& target, std::string_view content);

}  // namespace qg::io
