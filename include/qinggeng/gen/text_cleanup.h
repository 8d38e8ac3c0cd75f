// Clean-up of model output lines shared by both pipelines: whitespace normalisation and
// removal of list markers ("1.", "2、", "（3）", "Q4:", "- ") that must not eat digits
// belonging to the text ("1.5岁", "120/80mmHg", "2023年").
#pragma once

#include <string>
#include <string_view>

namespace qg::gen {

/// \brief Trims every line, collapses runs of spaces/tabs (ASCII and ideographic) to one
/// space, drops blank lines, unifies line ends to '\n'.
std::string normalize_whitespace(std::string_view text);

/// \brief `line` without its leading list marker and markdown decoration.
///
/// Removed: bullets ("-", "*", "•"), headings ("#"), bold markers, numbering such as "1." "1、"
/// "1)" "（1）" "[1]" "一、" "Q1:" "问题1：" "第1题：". A number followed by '.', ':' or '-' is
/// numbering only when the next character is not a digit, and numbers of four or more digits
/// are never numbering, so "1.5岁", "120/80mmHg", "2023年" stay intact.
std::string strip_list_marker(std::string_view line);

}  // namespace qg::gen
