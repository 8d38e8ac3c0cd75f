// Test support: a fresh scratch directory under the build tree and whole-file byte helpers.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace qg::test {

/// An empty directory QG_BINARY_DIR/test-scratch/<name>, recreated on construction.
inline std::filesystem::path scratch_dir(const std::string& name) {
  const auto dir = std::filesystem::path(QG_BINARY_DIR) / "test-scratch" / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::filesystem::path fixture(const std::string& rel) {
  return std::filesystem::path(QG_TEST_FIXTURES) / rel;
}

}  // namespace qg::test
