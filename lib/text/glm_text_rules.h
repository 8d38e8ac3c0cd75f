// GLM's text rules around sentencepiece (spec section 3): newlines, tabs and runs of spaces
// become dedicated pieces before encoding and are restored after decoding. Kept apart from the
// tokenizer so the rules can be tested against the HF tokenizer's chain of replacements.
#pragma once

#include <string>
#include <string_view>

namespace qg::text {

/// Longest run of spaces with a piece of its own; longer runs use several.
constexpr int kMaxBlank = 80;
constexpr std::string_view kNewlinePiece = "<n>";
constexpr std::string_view kTabPiece = "<|tab|>";

/// "<|blank_k|>", the piece for a run of `length` (2..80) spaces.
std::string blank_piece(int length);

/// Text as the sentencepiece model sees it: "\n" -> <n>, "\t" -> <|tab|>, and each run of
/// spaces -> <|blank_80|> per full 80, then <|blank_r|> for a remainder r >= 2 (a remainder of
/// one stays a space). Equal to the HF tokenizer's replace("\n"), replace("\t"), then
/// replace(" " * k) for k = 80 down to 2.
std::string glm_preprocess(std::string_view text);

/// The reverse on decoded text: <n> -> "\n", <|tab|> -> "\t", <|blank_k|> (k in 2..80, no
/// leading zeros) -> k spaces; everything else is copied.
std::string glm_postprocess(std::string_view text);

}  // namespace qg::text
