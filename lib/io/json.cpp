// Implementation of the internal JSON helpers (see json.h).
#include "io/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "qinggeng/error.h"

namespace qg::json {

Document Document::parse(std::string_view text, std::string origin) {
  Document d;
  d.parser_ = std::make_unique<simdjson::dom::parser>();
  d.text_ = simdjson::padded_string(text);
  d.origin_ = std::move(origin);
  auto result = d.parser_->parse(d.text_);
  if (result.error()) {
    fail(d.origin_, ": invalid JSON (", simdjson::error_message(result.error()), ")");
  }
  d.root_ = result.value_unsafe();
  return d;
}

Document Document::load(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open file");
  std::ostringstream buf;
  buf << in.rdbuf();
  return parse(buf.str(), file.string());
}

simdjson::dom::object as_object(simdjson::dom::element e, std::string_view origin,
                                std::string_view what) {
  simdjson::dom::object o;
  if (e.get(o)) fail(origin, ": ", what, " must be a JSON object");
  return o;
}

namespace {
simdjson::dom::element field(simdjson::dom::object o, std::string_view key,
                             std::string_view origin) {
  simdjson::dom::element e;
  if (o[key].get(e) || e.is_null()) fail(origin, ": missing field \"", key, "\"");
  return e;
}

bool present(simdjson::dom::object o, std::string_view key, simdjson::dom::element& e) {
  return !o[key].get(e) && !e.is_null();
}
}  // namespace

std::int64_t get_int(simdjson::dom::object o, std::string_view key, std::string_view origin) {
  auto e = field(o, key, origin);
  std::int64_t v;
  if (e.get(v)) {
    double d;
    if (!e.get(d) && d == static_cast<double>(static_cast<std::int64_t>(d))) {
      return static_cast<std::int64_t>(d);
    }
    fail(origin, ": field \"", key, "\" must be an integer");
  }
  return v;
}

double get_number(simdjson::dom::object o, std::string_view key, std::string_view origin) {
  auto e = field(o, key, origin);
  double v;
  if (e.get(v)) fail(origin, ": field \"", key, "\" must be a number");
  return v;
}

bool get_bool(simdjson::dom::object o, std::string_view key, std::string_view origin) {
  auto e = field(o, key, origin);
  bool v;
  if (e.get(v)) fail(origin, ": field \"", key, "\" must be true or false");
  return v;
}

std::string get_string(simdjson::dom::object o, std::string_view key, std::string_view origin) {
  auto e = field(o, key, origin);
  std::string_view v;
  if (e.get(v)) fail(origin, ": field \"", key, "\" must be a string");
  return std::string(v);
}

std::optional<std::int64_t> optional_int(simdjson::dom::object o, std::string_view key,
                                         std::string_view origin) {
  simdjson::dom::element e;
  if (!present(o, key, e)) return std::nullopt;
  return get_int(o, key, origin);
}

std::optional<double> optional_number(simdjson::dom::object o, std::string_view key,
                                      std::string_view origin) {
  simdjson::dom::element e;
  if (!present(o, key, e)) return std::nullopt;
  return get_number(o, key, origin);
}

std::optional<bool> optional_bool(simdjson::dom::object o, std::string_view key,
                                  std::string_view origin) {
  simdjson::dom::element e;
  if (!present(o, key, e)) return std::nullopt;
  return get_bool(o, key, origin);
}

std::optional<std::string> optional_string(simdjson::dom::object o, std::string_view key,
                                           std::string_view origin) {
  simdjson::dom::element e;
  if (!present(o, key, e)) return std::nullopt;
  return get_string(o, key, origin);
}

std::string quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
  return out;
}

std::string number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[40];
  for (int precision = 15; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace qg::json
