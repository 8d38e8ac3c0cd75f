// POSIX implementation of MappedFile (see mapped_file.h).
#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "qinggeng/error.h"

namespace qg::io {

namespace {
// Closes the descriptor when the mapping attempt leaves scope (the mapping outlives it).
struct FdCloser {
  int fd;
  ~FdCloser() { ::close(fd); }
};
}  // namespace

MappedFile MappedFile::open(const std::filesystem::path& path) {
  MappedFile file;
  file.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path.string(), ": cannot open file (", std::strerror(errno), ")");
  FdCloser closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path.string(), ": cannot stat file (", std::strerror(errno), ")");
  QG_CHECK(!S_ISDIR(st.st_mode), path.string(), ": is a directory, expected a file");
  QG_CHECK(S_ISREG(st.st_mode), path.string(), ": not a regular file");
  file.size_ = static_cast<std::size_t>(st.st_size);
  if (file.size_ == 0) return file;
  void* addr = ::mmap(nullptr, file.size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) fail(path.string(), ": cannot map file (", std::strerror(errno), ")");
  file.data_ = static_cast<const std::byte*>(addr);
  return file;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() { release(); }

void MappedFile::release() noexcept {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace qg::io
