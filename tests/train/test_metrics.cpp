// Metrics files: CRC32C against published vectors, and both writers read back: the JSONL lines
// with simdjson, the TensorBoard event file by decoding its TFRecord framing and protobuf
// fields here, independently of the writer's encoder.
#include <simdjson.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "qinggeng/error.h"
#include "qinggeng/train/metrics.h"
#include "train/tfrecord.h"

namespace {

namespace fs = std::filesystem;
using qg::train::Scalar;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::path(QG_BINARY_DIR) / name;
  fs::remove_all(dir);
  return dir;
}

template <typename T>
T load_le(std::string_view bytes, std::size_t at) {
  T v;
  REQUIRE(at + sizeof(T) <= bytes.size());
  std::memcpy(&v, bytes.data() + at, sizeof(T));
  return v;
}

// The fields of a decoded Event / Summary.Value that the tests look at.
struct DecodedValue {
  std::string tag;
  float value = 0;
};
struct DecodedEvent {
  double wall_time = 0;
  std::int64_t step = 0;
  std::string file_version;
  std::vector<DecodedValue> values;
};

// A protobuf message reader: varint keys, then varint / fixed64 / length-delimited / fixed32.
class ProtoReader {
 public:
  explicit ProtoReader(std::string_view b) : b_(b) {}
  bool done() const { return pos_ >= b_.size(); }
  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      REQUIRE(pos_ < b_.size());
      auto byte = static_cast<unsigned char>(b_[pos_++]);
      v |= static_cast<std::uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
  }
  std::string_view bytes() {
    auto n = static_cast<std::size_t>(varint());
    REQUIRE(pos_ + n <= b_.size());
    std::string_view out = b_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  template <typename T>
  T fixed() {
    T v = load_le<T>(b_, pos_);
    pos_ += sizeof(T);
    return v;
  }

 private:
  std::string_view b_;
  std::size_t pos_ = 0;
};

DecodedEvent decode_event(std::string_view payload) {
  DecodedEvent ev;
  ProtoReader r(payload);
  while (!r.done()) {
    std::uint64_t key = r.varint();
    if (key == (1 << 3 | 1)) {
      ev.wall_time = r.fixed<double>();
    } else if (key == (2 << 3 | 0)) {
      ev.step = static_cast<std::int64_t>(r.varint());
    } else if (key == (3 << 3 | 2)) {
      ev.file_version = std::string(r.bytes());
    } else if (key == (5 << 3 | 2)) {
      ProtoReader summary(r.bytes());
      while (!summary.done()) {
        REQUIRE(summary.varint() == (1 << 3 | 2));
        ProtoReader value(summary.bytes());
        DecodedValue v;
        while (!value.done()) {
          std::uint64_t k = value.varint();
          if (k == (1 << 3 | 2)) {
            v.tag = std::string(value.bytes());
          } else {
            REQUIRE(k == (2 << 3 | 5));
            v.value = value.fixed<float>();
          }
        }
        ev.values.push_back(v);
      }
    } else {
      FAIL("unexpected Event field key " << key);
    }
  }
  return ev;
}

// Splits a TFRecord file, checking both masked CRCs of every record.
std::vector<DecodedEvent> read_event_file(const fs::path& file) {
  std::string data = read_all(file);
  std::vector<DecodedEvent> events;
  std::size_t pos = 0;
  while (pos < data.size()) {
    auto length = load_le<std::uint64_t>(data, pos);
    std::string_view header(data.data() + pos, 8);
    CHECK(load_le<std::uint32_t>(data, pos + 8) == qg::train::tfrecord::masked_crc32c(header));
    REQUIRE(pos + 12 + length + 4 <= data.size());
    std::string_view payload(data.data() + pos + 12, static_cast<std::size_t>(length));
    CHECK(load_le<std::uint32_t>(data, pos + 12 + length) ==
          qg::train::tfrecord::masked_crc32c(payload));
    events.push_back(decode_event(payload));
    pos += 12 + length + 4;
  }
  return events;
}

}  // namespace

TEST_CASE("metrics: CRC32C matches published vectors", "[train][metrics]") {
  using qg::train::tfrecord::crc32c;
  CHECK(crc32c("123456789") == 0xE3069283u);
  CHECK(crc32c("") == 0u);
  CHECK(crc32c(std::string(32, '\0')) == 0x8A9136AAu);  // RFC 3720 B.4
  CHECK(crc32c(std::string(32, '\xFF')) == 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  CHECK(crc32c(ascending) == 0x46DD794Eu);
  std::uint32_t c = 0xE3069283u;
  CHECK(qg::train::tfrecord::masked_crc32c("123456789") == ((c >> 15) | (c << 17)) + 0xA282EAD8u);
}

TEST_CASE("metrics: TensorBoard event file round trip", "[train][metrics]") {
  fs::path dir = fresh_dir("train_tb_logs");
  fs::path first_path;
  {
    qg::train::TensorBoardWriter tb(dir);
    first_path = tb.path();
    tb.write(10, {{"train/loss", 2.5}, {"train/lr", 1e-4}});
    tb.write(20, {{"train/loss", 1.25}});
    tb.write(1LL << 40, {{"eval/perplexity", 3.0}});
    // Flushed on every write: a reader (TensorBoard) sees the records while the run goes on.
    CHECK(read_event_file(tb.path()).size() == 4);
  }
  std::string name = first_path.filename().string();
  CHECK(name.rfind("events.out.tfevents.", 0) == 0);
  auto events = read_event_file(first_path);
  REQUIRE(events.size() == 4);
  CHECK(events[0].file_version == "brain.Event:2");
  CHECK(events[0].wall_time > 1.6e9);
  CHECK(events[0].values.empty());
  CHECK(events[1].step == 10);
  CHECK(events[1].wall_time >= events[0].wall_time);
  REQUIRE(events[1].values.size() == 2);
  CHECK(events[1].values[0].tag == "train/loss");
  CHECK(events[1].values[0].value == 2.5f);
  CHECK(events[1].values[1].tag == "train/lr");
  CHECK(events[1].values[1].value == 1e-4f);
  CHECK(events[2].step == 20);
  CHECK(events[2].values.at(0).value == 1.25f);
  CHECK(events[3].step == (1LL << 40));
  CHECK(events[3].values.at(0).tag == "eval/perplexity");

  // A second writer in the same second gets its own file.
  qg::train::TensorBoardWriter again(dir);
  CHECK(again.path() != first_path);
  REQUIRE_THROWS_WITH(again.write(1, {{"", 1.0}}), QG_CONTAINS("empty tag"));
}

TEST_CASE("metrics: JSONL lines are flushed JSON objects", "[train][metrics]") {
  fs::path file = fresh_dir("train_jsonl_logs") / "metrics.jsonl";
  qg::train::JsonlMetricsWriter w(file);
  w.write(1, {{"train/loss", 2.5}, {"train/lr", 0.0001}});
  w.write(2, {{"train/loss", std::numeric_limits<double>::quiet_NaN()}, {"say \"hi\"", -3}});
  REQUIRE_THROWS_WITH(w.write(3, {{"step", 1.0}}), QG_CONTAINS("reserved"));
  REQUIRE_THROWS_WITH(w.write(3, {{"", 1.0}}), QG_CONTAINS("metrics.jsonl"));

  std::string text = read_all(file);  // read while the writer is open: already flushed
  std::istringstream lines(text);
  std::string line;
  std::vector<std::string> all;
  while (std::getline(lines, line)) all.push_back(line);
  REQUIRE(all.size() == 2);
  simdjson::dom::parser parser;
  simdjson::dom::element first = parser.parse(all[0]);
  CHECK(int64_t(first["step"]) == 1);
  CHECK(double(first["wall_time"]) > 1.6e9);
  CHECK(double(first["train/loss"]) == 2.5);
  CHECK(double(first["train/lr"]) == 0.0001);
  simdjson::dom::element second = parser.parse(all[1]);
  CHECK(second["train/loss"].is_null());
  CHECK(double(second["say \"hi\""]) == -3.0);

  REQUIRE_THROWS_WITH(qg::train::JsonlMetricsWriter(fs::path(QG_BINARY_DIR) / "train_jsonl_logs" /
                                                    "metrics.jsonl" / "sub"),
                      QG_CONTAINS("metrics.jsonl"));
}
