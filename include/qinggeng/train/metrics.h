// Training metrics on disk: JSON Lines (one object per step, easy to plot or grep) and
// TensorBoard event files written directly, without TensorFlow. docs/training-data.md shows
// how to read both.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace qg::train {

/// \brief One named value at a step ("train/loss", "train/lr", "eval/perplexity", ...).
struct Scalar {
  std::string tag;
  double value = 0.0;
};

namespace detail {
struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;
}  // namespace detail

/// \brief Something that records scalars per step; qg-train keeps a list of them.
class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  /// \brief Records `scalars` at `step`, flushed to the file before returning.
  /// \throws qg::Error naming the file when writing fails or a tag is empty.
  virtual void write(std::int64_t step, const std::vector<Scalar>& scalars) = 0;
};

/// \brief Appends `{"step":S,"wall_time":T,"<tag>":v,...}` lines (non-finite values as null).
/// Tags "step" and "wall_time" are refused, since they would repeat a key.
class JsonlMetricsWriter : public MetricsSink {
 public:
  /// \brief Opens `path` for appending, creating it and its directory.
  /// \throws qg::Error naming the file when it cannot be opened.
  explicit JsonlMetricsWriter(const std::filesystem::path& path);

  void write(std::int64_t step, const std::vector<Scalar>& scalars) override;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  detail::FilePtr file_;
};

/// \brief Writes a TensorBoard event file `log_dir/events.out.tfevents.<unix time>.<hostname>`
/// (with ".1", ".2", ... appended if that name is taken): TFRecord-framed tensorflow.Event
/// protobufs, the first holding file_version "brain.Event:2", then one Event per write() with
/// a simple_value (float) per scalar. `tensorboard --logdir log_dir` shows them.
class TensorBoardWriter : public MetricsSink {
 public:
  /// \throws qg::Error naming the directory or file when it cannot be created.
  explicit TensorBoardWriter(const std::filesystem::path& log_dir);

  void write(std::int64_t step, const std::vector<Scalar>& scalars) override;
  /// \brief The event file being written.
  const std::filesystem::path& path() const { return path_; }

 private:
  void append_record(const std::string& payload);
  std::filesystem::path path_;
  detail::FilePtr file_;
};

}  // namespace qg::train
