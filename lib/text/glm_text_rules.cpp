// GLM's newline/tab/space-run rules, in one pass each way (see glm_text_rules.h).
#include "text/glm_text_rules.h"

#include <optional>
#include <utility>

namespace qg::text {
namespace {

// Length k of a "<|blank_k|>" piece (2 <= k <= 80, written without leading zeros) at the
// start of `s`, with the piece's size; nullopt when `s` does not start with one.
std::optional<std::pair<int, std::size_t>> blank_at(std::string_view s) {
  constexpr std::string_view kOpen = "<|blank_";
  if (s.substr(0, kOpen.size()) != kOpen) return std::nullopt;
  std::size_t pos = kOpen.size();
  int length = 0;
  const std::size_t digits_begin = pos;
  while (pos < s.size() && pos - digits_begin < 2 && s[pos] >= '0' && s[pos] <= '9') {
    length = length * 10 + (s[pos] - '0');
    ++pos;
  }
  if (pos == digits_begin || s[digits_begin] == '0' || s.substr(pos, 2) != "|>") {
    return std::nullopt;
  }
  if (length < 2 || length > kMaxBlank) return std::nullopt;
  return std::make_pair(length, pos + 2);
}

}  // namespace

std::string blank_piece(int length) { return "<|blank_" + std::to_string(length) + "|>"; }

// The GLM encode rules in one pass; equivalent to the HF tokenizer's sequence of str.replace
// calls, since no replacement produces a space, tab or newline that a later one could match.
// A run of more than 80 spaces becomes <|blank_80|> repeatedly, then the remainder.
std::string glm_preprocess(std::string_view text) {
  std::string out;
  out.reserve(text.size() + text.size() / 4);
  for (std::size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (c == '\n') {
      out += kNewlinePiece;
      ++i;
    } else if (c == '\t') {
      out += kTabPiece;
      ++i;
    } else if (c == ' ') {
      std::size_t run = 0;
      while (i + run < text.size() && text[i + run] == ' ') ++run;
      i += run;
      for (; run >= kMaxBlank; run -= kMaxBlank) out += blank_piece(kMaxBlank);
      if (run >= 2) out += blank_piece(static_cast<int>(run));
      if (run == 1) out += ' ';
    } else {
      out += c;
      ++i;
    }
  }
  return out;
}

// The reverse of glm_preprocess on decoded text. The three kinds of piece start with '<',
// end with '>' and hold neither inside, so occurrences never overlap and one pass matches
// what the HF tokenizer's chain of replacements does.
std::string glm_postprocess(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    const std::string_view rest = text.substr(i);
    if (rest[0] != '<') {
      out += rest[0];
      ++i;
    } else if (rest.substr(0, kNewlinePiece.size()) == kNewlinePiece) {
      out += '\n';
      i += kNewlinePiece.size();
    } else if (rest.substr(0, kTabPiece.size()) == kTabPiece) {
      out += '\t';
      i += kTabPiece.size();
    } else if (auto blank = blank_at(rest)) {
      out.append(static_cast<std::size_t>(blank->first), ' ');
      i += blank->second;
    } else {
      out += '<';
      ++i;
    }
  }
  return out;
}

}  // namespace qg::text
