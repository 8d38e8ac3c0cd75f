// JSON Lines output that survives kill -9: each record is appended with a single write() and
// flushed, and a torn last line left by an interrupted run is cut off before appending again.
#pragma once

#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>
#include <string_view>

namespace qg::gen {

/// \brief Builds one flat JSON object, field by field, in insertion order.
class JsonObject {
 public:
  JsonObject& add_string(std::string_view key, std::string_view value);
  JsonObject& add_number(std::string_view key, double value);
  JsonObject& add_int(std::string_view key, std::int64_t value);
  JsonObject& add_bool(std::string_view key, bool value);
  /// \brief Adds `json` (already valid JSON: an array, object, ...) verbatim.
  JsonObject& add_raw(std::string_view key, std::string_view json);
  /// \brief The object text, "{...}", without a newline.
  std::string str() const { return body_ + "}"; }

 private:
  JsonObject& key(std::string_view k);
  JsonObject& add_raw_value(std::string_view json);
  std::string body_ = "{";
};

/// \brief Cuts a torn tail off a JSONL file: bytes after the last newline, and a last line
/// that is not valid JSON. Returns the number of bytes removed (0 when the file is intact or
/// absent). Earlier lines are not examined.
std::uint64_t repair_jsonl_tail(const std::filesystem::path& path);

/// \brief Appends JSON objects to a file, one per line, thread-safely.
class JsonlWriter {
 public:
  /// \brief Opens `path` for appending (creating it and its directory), first calling
  /// repair_jsonl_tail. When `sync` is true every record is also fsync'ed.
  explicit JsonlWriter(const std::filesystem::path& path, bool sync = false);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;

  /// \brief Appends `object` (one JSON value, no newline inside) plus '\n' in one write.
  void append(std::string_view object);
  /// \brief Bytes cut off the tail when the file was opened.
  std::uint64_t repaired_bytes() const { return repaired_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  bool sync_ = false;
  std::uint64_t repaired_ = 0;
  std::mutex mutex_;
};

}  // namespace qg::gen
