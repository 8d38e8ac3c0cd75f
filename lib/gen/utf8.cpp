// UTF-8 decoding and character classes for the generators (see utf8.h).
#include "gen/utf8.h"

namespace qg::gen::utf8 {

namespace {
// Length of the sequence introduced by lead byte `b`, 0 for an invalid lead byte.
int sequence_length(unsigned char b) {
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}

// Decodes one sequence at `i`; returns its length or 0 when invalid (overlong, surrogate,
// truncated, out of range).
int decode(std::string_view s, std::size_t i, char32_t& out) {
  auto b0 = static_cast<unsigned char>(s[i]);
  int n = sequence_length(b0);
  if (n == 0 || i + n > s.size()) return 0;
  if (n == 1) {
    out = b0;
    return 1;
  }
  char32_t c = b0 & (0x7F >> n);
  for (int k = 1; k < n; ++k) {
    auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 0;
    c = (c << 6) | (b & 0x3F);
  }
  static constexpr char32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (c < kMin[n] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
  out = c;
  return n;
}
}  // namespace

char32_t next(std::string_view s, std::size_t& i) {
  char32_t c = 0;
  int n = decode(s, i, c);
  if (n == 0) {
    ++i;
    return 0xFFFD;
  }
  i += n;
  return c;
}

std::size_t first_invalid(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    char32_t c;
    int n = decode(s, i, c);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

std::size_t length(std::string_view s) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < s.size(); ++n) next(s, i);
  return n;
}

void append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::u32string decode_all(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) out.push_back(next(s, i));
  return out;
}

std::string encode_all(std::u32string_view s) {
  std::string out;
  for (char32_t c : s) append(out, c);
  return out;
}

bool is_cjk_ideograph(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x20000 && c <= 0x3134F);
}

bool is_separator(char32_t c) {
  if (c < 0x80) {
    bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    return !alnum;
  }
  return (c >= 0x2000 && c <= 0x206F) ||  // general punctuation, spaces
         (c >= 0x3000 && c <= 0x303F) ||  // CJK symbols and punctuation
         (c >= 0xFE30 && c <= 0xFE4F) ||  // CJK compatibility forms
         (c >= 0xFF01 && c <= 0xFF0F) || (c >= 0xFF1A && c <= 0xFF20) ||
         (c >= 0xFF3B && c <= 0xFF40) || (c >= 0xFF5B && c <= 0xFF65) || c == 0x00A0 ||
         c == 0x00B7 || c == 0xFEFF;
}

char32_t fold_width(char32_t c) {
  if (c >= 0xFF01 && c <= 0xFF5E) return c - 0xFEE0;
  if (c == 0x3000) return ' ';
  return c;
}

bool has_cjk(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (is_cjk_ideograph(next(s, i))) return true;
  }
  return false;
}

}  // namespace qg::gen::utf8
