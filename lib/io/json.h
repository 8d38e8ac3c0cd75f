// Internal JSON helpers over simdjson (kept out of the public headers so users of the library
// need no simdjson). Reading: whole documents and JSONL lines with typed field access whose
// errors name the file and field. Writing: string escaping for the small JSON we emit.
#pragma once

#include <simdjson.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qg::json {

/// A parsed JSON document (DOM) plus the name used in error messages ("config.json", a path).
class Document {
 public:
  /// Parses `text`; `origin` names the source in errors. Throws qg::Error on invalid JSON.
  static Document parse(std::string_view text, std::string origin);
  /// Reads and parses a file. Throws qg::Error naming the file if missing or invalid.
  static Document load(const std::filesystem::path& file);

  simdjson::dom::element root() const { return root_; }
  const std::string& origin() const { return origin_; }

 private:
  std::unique_ptr<simdjson::dom::parser> parser_;
  simdjson::padded_string text_;
  simdjson::dom::element root_;
  std::string origin_;
};

/// The object at `e`, or qg::Error "<origin>: <what> must be a JSON object".
simdjson::dom::object as_object(simdjson::dom::element e, std::string_view origin,
                                std::string_view what);

/// Field access on an object; `origin` (file name) is used in error messages.
/// The optional_* forms return nullopt when the key is absent or null, and throw when present
/// with the wrong type.
std::int64_t get_int(simdjson::dom::object o, std::string_view key, std::string_view origin);
double get_number(simdjson::dom::object o, std::string_view key, std::string_view origin);
bool get_bool(simdjson::dom::object o, std::string_view key, std::string_view origin);
std::string get_string(simdjson::dom::object o, std::string_view key, std::string_view origin);
std::optional<std::int64_t> optional_int(simdjson::dom::object o, std::string_view key,
                                         std::string_view origin);
std::optional<double> optional_number(simdjson::dom::object o, std::string_view key,
                                      std::string_view origin);
std::optional<bool> optional_bool(simdjson::dom::object o, std::string_view key,
                                  std::string_view origin);
std::optional<std::string> optional_string(simdjson::dom::object o, std::string_view key,
                                           std::string_view origin);

/// `"..."`: the JSON string literal for UTF-8 text `s` (quotes included).
std::string quote(std::string_view s);

/// A decimal that reads back as exactly `v`, with as few of 15, 16 or 17 significant digits as
/// that takes ("16", "0.1", "1e-05"); "null" for inf / NaN, which JSON cannot hold.
std::string number(double v);

}  // namespace qg::json
