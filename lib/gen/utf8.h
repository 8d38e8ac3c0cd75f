// UTF-8 decoding and character classes used by the generators: ROUGE-L tokenisation (one token
// per CJK character), the "must contain Chinese" filter, passage splitting by characters, and
// validation of input text so non-UTF-8 files fail with a clear message.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace qg::gen::utf8 {

/// Decodes the code point starting at `s[i]` and advances `i` past it. Invalid bytes decode as
/// U+FFFD one byte at a time (callers that need strictness call first_invalid() first).
char32_t next(std::string_view s, std::size_t& i);

/// Byte offset of the first invalid UTF-8 sequence in `s`, or npos when `s` is valid.
std::size_t first_invalid(std::string_view s);

/// Number of code points in `s`.
std::size_t length(std::string_view s);

/// Appends the UTF-8 encoding of `c` to `out`.
void append(std::string& out, char32_t c);

/// All code points of `s` (invalid bytes as U+FFFD).
std::u32string decode_all(std::string_view s);

/// UTF-8 encoding of `s`.
std::string encode_all(std::u32string_view s);

/// CJK ideographs (unified, extensions A-G, compatibility).
bool is_cjk_ideograph(char32_t c);

/// Punctuation and spacing that separates tokens: ASCII punctuation/space, CJK symbols and
/// punctuation, full-width punctuation, general punctuation.
bool is_separator(char32_t c);

/// Maps full-width ASCII variants (U+FF01..U+FF5E) and the ideographic space to ASCII.
char32_t fold_width(char32_t c);

/// True when `s` contains at least one CJK ideograph.
bool has_cjk(std::string_view s);

}  // namespace qg::gen::utf8
