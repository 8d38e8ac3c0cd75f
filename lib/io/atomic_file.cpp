// Implementation of the write-then-rename output file (see atomic_file.h).
#include "io/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>

#include "qinggeng/error.h"

namespace qg::io {

AtomicFileWriter::AtomicFileWriter(std::filesystem::path target) : target_(std::move(target)) {
  tmp_ = target_;
  tmp_ += ".tmp." + std::to_string(::getpid());
  file_ = std::fopen(tmp_.c_str(), "wb");
  if (file_ == nullptr) {
    fail(target_.string(), ": cannot create file (", std::strerror(errno), ")");
  }
}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_ != nullptr) {
    std::fclose(file_);
    std::error_code ignored;
    std::filesystem::remove(tmp_, ignored);
  }
}

void AtomicFileWriter::write(const void* data, std::size_t n) {
  QG_CHECK(file_ != nullptr, target_.string(), ": write after commit");
  if (n != 0 && std::fwrite(data, 1, n, file_) != n) {
    fail(target_.string(), ": write failed (", std::strerror(errno), ")");
  }
}

void AtomicFileWriter::commit() {
  QG_CHECK(file_ != nullptr, target_.string(), ": committed twice");
  const bool flushed = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  const int saved_errno = errno;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  std::error_code ec;
  if (!flushed || !closed) {
    std::filesystem::remove(tmp_, ec);
    fail(target_.string(), ": write failed (", std::strerror(flushed ? errno : saved_errno), ")");
  }
  std::filesystem::rename(tmp_, target_, ec);
  if (ec) {
    const std::string why = ec.message();
    std::filesystem::remove(tmp_, ec);
    fail(target_.string(), ": cannot rename the temporary file into place (", why, ")");
  }
}

void write_file_atomic(const std::filesystem::path& target, std::string_view content) {
  AtomicFileWriter out(target);
  out.write(content);
  out.commit();
}

}  // namespace qg::io
