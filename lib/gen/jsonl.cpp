// JSON Lines writing with torn-tail repair, and reading (see jsonl.h, jsonl_reader.h).
#include "qinggeng/gen/jsonl.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "gen/jsonl_reader.h"
#include "io/json.h"
#include "qinggeng/error.h"

namespace qg::gen {

JsonObject& JsonObject::key(std::string_view k) {
  if (body_.size() > 1) body_.push_back(',');
  body_ += json::quote(k);
  body_.push_back(':');
  return *this;
}

JsonObject& JsonObject::add_string(std::string_view k, std::string_view value) {
  key(k).body_ += json::quote(value);
  return *this;
}

JsonObject& JsonObject::add_number(std::string_view k, double value) {
  if (!std::isfinite(value)) return key(k).add_raw_value("null");
  std::ostringstream out;
  out.precision(17);
  out << value;
  return key(k).add_raw_value(out.str());
}

JsonObject& JsonObject::add_int(std::string_view k, std::int64_t value) {
  return key(k).add_raw_value(std::to_string(value));
}

JsonObject& JsonObject::add_bool(std::string_view k, bool value) {
  return key(k).add_raw_value(value ? "true" : "false");
}

JsonObject& JsonObject::add_raw(std::string_view k, std::string_view json) {
  return key(k).add_raw_value(json);
}

JsonObject& JsonObject::add_raw_value(std::string_view json) {
  body_ += json;
  return *this;
}

namespace {
std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  QG_CHECK(in, path.string(), ": cannot open file");
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

bool parses_as_object(simdjson::dom::parser& parser, std::string_view line) {
  simdjson::dom::object o;
  return !parser.parse(simdjson::padded_string(line)).get(o);
}
}  // namespace

std::uint64_t repair_jsonl_tail(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return 0;
  std::string text = read_file(path);
  // An unterminated tail is the torn write of an interrupted run.
  std::size_t last_nl = text.rfind('\n');
  std::size_t keep = last_nl == std::string::npos ? 0 : last_nl + 1;
  // The last complete line must also be a whole record.
  if (keep > 0) {
    std::size_t prev = keep >= 2 ? text.rfind('\n', keep - 2) : std::string::npos;
    std::size_t start = prev == std::string::npos ? 0 : prev + 1;
    std::string_view line(text.data() + start, keep - 1 - start);
    simdjson::dom::parser parser;
    if (!is_blank(line) && !parses_as_object(parser, line)) keep = start;
  }
  if (keep == text.size()) return 0;
  std::filesystem::resize_file(path, keep, ec);
  QG_CHECK(!ec, path.string(), ": cannot truncate torn last line (", ec.message(), ")");
  return text.size() - keep;
}

JsonlWriter::JsonlWriter(const std::filesystem::path& path, bool sync) : path_(path), sync_(sync) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  repaired_ = repair_jsonl_tail(path);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  QG_CHECK(fd_ >= 0, path.string(), ": cannot open for appending (", std::strerror(errno), ")");
}

JsonlWriter::~JsonlWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void JsonlWriter::append(std::string_view object) {
  QG_CHECK(object.find('\n') == std::string_view::npos,
           path_.string(), ": a JSONL record must not contain a raw newline");
  std::string line(object);
  line.push_back('\n');
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    QG_CHECK(n > 0, path_.string(), ": write failed (", std::strerror(errno), ")");
    done += static_cast<std::size_t>(n);
  }
  if (sync_) ::fdatasync(fd_);
}

void for_each_jsonl_object(
    const std::filesystem::path& path,
    const std::function<void(simdjson::dom::object, const std::string& origin)>& fn) {
  std::string text = read_file(path);
  simdjson::dom::parser parser;
  std::size_t line_no = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (is_blank(line)) continue;
    std::string origin = path.string() + ":" + std::to_string(line_no);
    simdjson::padded_string padded(line);
    simdjson::dom::element e;
    if (auto err = parser.parse(padded).get(e)) {
      fail(origin, ": invalid JSON (", simdjson::error_message(err), ")");
    }
    simdjson::dom::object o;
    if (e.get(o)) fail(origin, ": line must be a JSON object");
    fn(o, origin);
  }
}

}  // namespace qg::gen
