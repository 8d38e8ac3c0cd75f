// Passages for book QA: loaded from a JSON array of strings, a JSONL file, or UTF-8 .txt books
// split into ~500-character passages at sentence boundaries without breaking numbers and
// their units.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace qg::gen {

/// \brief A passage and its stable id ("<source>#<index>"), used to resume.
struct Passage {
  std::string id;
  std::string text;
};

/// \brief Passage sizes in characters (code points).
struct SplitOptions {
  std::size_t target_chars = 500;  ///< close a passage before it would exceed this
  std::size_t max_chars = 800;     ///< hard limit; longer sentences are cut at safe points
  std::size_t min_chars = 100;     ///< a shorter passage is extended past the target
};

/// \brief Splits `text` into passages at sentence ends (。！？；… newline, and . ! ? followed by
/// a space or the end), packing whole sentences up to the target size. A sentence over
/// `max_chars` is cut after a comma or space where possible, never inside or right after a
/// number ("3.5mg", "120/80mmHg", "5毫克" stay whole). Whitespace is normalised.
std::vector<std::string> split_passages(std::string_view text, const SplitOptions& options = {});

/// \brief Loads passages from `path`:
///  - a directory: every *.txt file below it (sorted), each split with split_passages;
///  - a .txt file: split likewise;
///  - a .jsonl file: one object per line, the passage in string field `text_field`;
///  - any other file: a JSON array of strings (or of objects with `text_field`).
/// JSON entries are used as given (not re-split). Throws qg::Error naming the file for invalid
/// UTF-8 (with the byte offset), invalid JSON, a missing field, or when no passage results.
std::vector<Passage> load_passages(const std::filesystem::path& path,
                                   const SplitOptions& options = {},
                                   const std::string& text_field = "text");

}  // namespace qg::gen
