// Whitespace normalisation and list-marker stripping (see text_cleanup.h).
#include "qinggeng/gen/text_cleanup.h"

#include "gen/utf8.h"

namespace qg::gen {

namespace {

bool is_space(char32_t c) { return c == ' ' || c == '\t' || c == 0x3000 || c == 0xA0 || c == '\r'; }

bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }

bool is_chinese_numeral(char32_t c) {
  static const std::u32string numerals = U"一二三四五六七八九十";
  return numerals.find(c) != std::u32string::npos;
}

bool starts_with(std::u32string_view s, std::u32string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

void skip_spaces(std::u32string_view& s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
}

// Removes bullets, headings, quote markers and bold markers at the front.
void strip_decoration(std::u32string_view& s) {
  for (bool changed = true; changed;) {
    changed = false;
    skip_spaces(s);
    if (starts_with(s, U"**") || starts_with(s, U"__")) {
      s.remove_prefix(2);
      changed = true;
    } else if (!s.empty() && (s.front() == '#' || s.front() == '>')) {
      while (!s.empty() && (s.front() == '#' || s.front() == '>')) s.remove_prefix(1);
      changed = true;
    } else if (s.size() >= 2 && (s[0] == '-' || s[0] == '*' || s[0] == 0x2022 || s[0] == 0xB7) &&
               is_space(s[1])) {
      s.remove_prefix(2);
      changed = true;
    } else if (!s.empty() && (s[0] == 0x2022 || s[0] == 0xB7)) {
      s.remove_prefix(1);
      changed = true;
    }
  }
}

// Length of the number (ASCII digits or Chinese numerals) at the front of `s`.
std::size_t number_length(std::u32string_view s) {
  std::size_t n = 0;
  if (!s.empty() && is_digit(s[0])) {
    while (n < s.size() && is_digit(s[n])) ++n;
  } else {
    while (n < s.size() && is_chinese_numeral(s[n])) ++n;
  }
  return n;
}

// Removes one numbering marker at the front; returns whether one was found.
bool strip_numbering(std::u32string_view& s) {
  // Bracketed: (1) （1） [1] 【1】
  static const std::u32string opens = U"(（[【";
  static const std::u32string closes = U")）]】";
  if (!s.empty() && opens.find(s[0]) != std::u32string::npos) {
    std::size_t n = number_length(s.substr(1));
    if (n > 0 && n < 4 && s.size() > n + 1 && closes.find(s[n + 1]) != std::u32string::npos) {
      s.remove_prefix(n + 2);
      return true;
    }
    return false;
  }
  // Optional label: Q1  问题1  问1  第1题 / 第一个问题
  std::u32string_view rest = s;
  bool labelled = false;
  for (std::u32string_view label : {U"问题", U"Question", U"question", U"Q", U"q", U"问", U"第"}) {
    if (starts_with(rest, label)) {
      rest.remove_prefix(label.size());
      labelled = true;
      break;
    }
  }
  skip_spaces(rest);
  std::size_t n = number_length(rest);
  if (n == 0) {
    // "问题：..." with no number.
    if (labelled && !rest.empty() && (rest[0] == ':' || rest[0] == 0xFF1A)) {
      s = rest.substr(1);
      return true;
    }
    return false;
  }
  if (n >= 4) return false;
  rest.remove_prefix(n);
  for (std::u32string_view suffix : {U"个问题", U"题", U"个"}) {
    if (labelled && starts_with(rest, suffix)) {
      rest.remove_prefix(suffix.size());
      break;
    }
  }
  if (rest.empty()) return false;
  char32_t d = rest[0];
  bool next_is_digit = rest.size() > 1 && is_digit(rest[1]);
  // Unambiguous delimiters; '.', ':' and '-' only when no digit follows ("1.5", "3:1").
  bool strong = d == 0x3001 /*、*/ || d == ')' || d == 0xFF09 /*）*/ || d == 0xFF0E /*．*/ ||
                d == 0xFF1A /*：*/ || d == 0xFF0C /*，*/;
  bool weak = (d == '.' || d == ':' || d == '-') && !next_is_digit;
  if (strong || weak) {
    s = rest.substr(1);
    return true;
  }
  // "Q1 text" / "第1题 text": a label and a number followed by a space.
  if (labelled && is_space(d)) {
    s = rest;
    return true;
  }
  // A number with no delimiter is text: "十二指肠", "3岁".
  return false;
}

}  // namespace

std::string normalize_whitespace(std::string_view text) {
  std::string out;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::u32string line = utf8::decode_all(text.substr(start, end - start));
    std::u32string clean;
    for (char32_t c : line) {
      if (is_space(c)) {
        if (!clean.empty() && clean.back() != ' ') clean.push_back(' ');
      } else {
        clean.push_back(c);
      }
    }
    while (!clean.empty() && clean.back() == ' ') clean.pop_back();
    if (!clean.empty()) {
      if (!out.empty()) out.push_back('\n');
      out += utf8::encode_all(clean);
    }
    start = end + 1;
  }
  return out;
}

std::string strip_list_marker(std::string_view line) {
  std::u32string text = utf8::decode_all(line);
  std::u32string_view s = text;
  strip_decoration(s);
  if (strip_numbering(s)) {
    skip_spaces(s);
    strip_decoration(s);
  }
  std::u32string_view rest = s;
  while (!rest.empty() && (is_space(rest.back()))) rest.remove_suffix(1);
  if (rest.size() >= 2 && rest.substr(rest.size() - 2) == U"**") rest.remove_suffix(2);
  return utf8::encode_all(rest);
}

}  // namespace qg::gen
