// JSONL and TensorBoard metrics writers (see metrics.h; the event encoding is tfrecord.cpp).
#include "qinggeng/train/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include "io/json.h"
#include "qinggeng/error.h"
#include "train/tfrecord.h"

namespace qg::train {

namespace {

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

void check_tags(const std::vector<Scalar>& scalars, const std::filesystem::path& file) {
  for (const Scalar& s : scalars) {
    QG_CHECK(!s.tag.empty(), file.string(), ": metric with an empty tag");
  }
}

void write_all(std::FILE* f, const std::string& bytes, const std::filesystem::path& file) {
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && std::fflush(f) == 0;
  QG_CHECK(ok, file.string(), ": cannot write metrics (", std::strerror(errno), ")");
}

std::string hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

JsonlMetricsWriter::JsonlMetricsWriter(const std::filesystem::path& path) : path_(path) {
  std::error_code ec;
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
  QG_CHECK(!ec, path.string(), ": cannot create the metrics directory (", ec.message(), ")");
  file_.reset(std::fopen(path.c_str(), "ab"));
  QG_CHECK(file_, path.string(), ": cannot open metrics file (", std::strerror(errno), ")");
}

void JsonlMetricsWriter::write(std::int64_t step, const std::vector<Scalar>& scalars) {
  check_tags(scalars, path_);
  char number[32];
  std::snprintf(number, sizeof(number), "%.3f", now_seconds());
  std::string line = "{\"step\":" + std::to_string(step) + ",\"wall_time\":" + number;
  for (const Scalar& s : scalars) {
    QG_CHECK(s.tag != "step" && s.tag != "wall_time", path_.string(), ": metric tag \"", s.tag,
             "\" is reserved");
    if (std::isfinite(s.value)) {
      std::snprintf(number, sizeof(number), "%.10g", s.value);
    } else {
      std::snprintf(number, sizeof(number), "null");
    }
    line += "," + json::quote(s.tag) + ":" + number;
  }
  line += "}\n";
  write_all(file_.get(), line, path_);
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& log_dir) {
  std::error_code ec;
  std::filesystem::create_directories(log_dir, ec);
  QG_CHECK(!ec, log_dir.string(), ": cannot create TensorBoard log directory (", ec.message(), ")");
  double wall_time = now_seconds();
  std::string base =
      "events.out.tfevents." + std::to_string(static_cast<long long>(wall_time)) + "." + hostname();
  // "x": never append to another writer's file started in the same second.
  for (int suffix = 0; !file_ && suffix < 1000; ++suffix) {
    path_ = log_dir / (suffix == 0 ? base : base + "." + std::to_string(suffix));
    file_.reset(std::fopen(path_.c_str(), "wbx"));
    QG_CHECK(file_ || errno == EEXIST, path_.string(), ": cannot create event file (",
             std::strerror(errno), ")");
  }
  QG_CHECK(file_, path_.string(), ": cannot create event file (all names taken)");
  append_record(tfrecord::file_version_event(wall_time));
}

void TensorBoardWriter::write(std::int64_t step, const std::vector<Scalar>& scalars) {
  check_tags(scalars, path_);
  append_record(tfrecord::scalars_event(now_seconds(), step, scalars));
}

void TensorBoardWriter::append_record(const std::string& payload) {
  write_all(file_.get(), tfrecord::frame(payload), path_);
}

}  // namespace qg::train
