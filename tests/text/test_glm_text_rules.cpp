// GLM's newline/tab/space-run rules, checked against a direct transcription of the HF
// ChatGLMTokenizer's chain of str.replace calls on random and hand-picked text.
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "text/glm_text_rules.h"

namespace {

using qg::text::blank_piece;
using qg::text::glm_postprocess;
using qg::text::glm_preprocess;

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (std::size_t pos = text.find(from); pos != std::string::npos;
       pos = text.find(from, pos + to.size())) {
    text.replace(pos, from.size(), to);
  }
}

// SPTokenizer._preprocess: "\n", then "\t", then runs of k = 80 .. 2 spaces.
std::string hf_preprocess(std::string text) {
  replace_all(text, "\n", "<n>");
  replace_all(text, "\t", "<|tab|>");
  for (int k = 80; k >= 2; --k) replace_all(text, std::string(k, ' '), blank_piece(k));
  return text;
}

// SPTokenizer.decode after sentencepiece: "<n>", "<|tab|>", then blanks k = 2 .. 80.
std::string hf_postprocess(std::string text) {
  replace_all(text, "<n>", "\n");
  replace_all(text, "<|tab|>", "\t");
  for (int k = 2; k <= 80; ++k) replace_all(text, blank_piece(k), std::string(k, ' '));
  return text;
}

std::string random_text(std::mt19937& rng, const std::vector<std::string>& parts, int max_parts) {
  std::uniform_int_distribution<int> count(0, max_parts);
  std::uniform_int_distribution<std::size_t> pick(0, parts.size() - 1);
  std::string text;
  for (int n = count(rng); n > 0; --n) text += parts[pick(rng)];
  return text;
}

}  // namespace

TEST_CASE("glm_preprocess maps newlines, tabs and space runs", "[text][rules]") {
  CHECK(glm_preprocess("") == "");
  CHECK(glm_preprocess("a\nb") == "a<n>b");
  CHECK(glm_preprocess("a\tb") == "a<|tab|>b");
  CHECK(glm_preprocess("a b") == "a b");
  CHECK(glm_preprocess("a  b") == "a<|blank_2|>b");
  CHECK(glm_preprocess(std::string(80, ' ')) == "<|blank_80|>");
  CHECK(glm_preprocess("x" + std::string(81, ' ') + "y") == "x<|blank_80|> y");
  CHECK(glm_preprocess(std::string(100, ' ')) == "<|blank_80|><|blank_20|>");
  CHECK(glm_preprocess(std::string(162, ' ')) == "<|blank_80|><|blank_80|><|blank_2|>");
  CHECK(glm_preprocess(" \n  \t   ") == " <n><|blank_2|><|tab|><|blank_3|>");
  CHECK(glm_preprocess("血压\n120/80 mmHg") == "血压<n>120/80 mmHg");
}

TEST_CASE("glm_preprocess equals the HF chain of replacements", "[text][rules]") {
  for (int k = 0; k <= 250; ++k) {
    const std::string text = "a" + std::string(k, ' ') + "b" + std::string(k, ' ');
    REQUIRE(glm_preprocess(text) == hf_preprocess(text));
  }
  std::mt19937 rng(7);
  const std::vector<std::string> parts = {" ", "  ", std::string(37, ' '), std::string(79, ' '),
                                          "\n", "\t", "a", "字", "<", "|>", "blank_"};
  for (int trial = 0; trial < 2000; ++trial) {
    const std::string text = random_text(rng, parts, 12);
    REQUIRE(glm_preprocess(text) == hf_preprocess(text));
  }
}

TEST_CASE("glm_postprocess restores the text and equals the HF chain", "[text][rules]") {
  CHECK(glm_postprocess("a<n>b<|tab|>c<|blank_2|>d<|blank_80|>e") ==
        "a\nb\tc  d" + std::string(80, ' ') + "e");
  // Not pieces: out of range, leading zero, unterminated.
  for (const char* kept : {"<|blank_1|>", "<|blank_81|>", "<|blank_05|>", "<|blank_|>",
                           "<|blank_123|>", "<|blank_4", "<n", "<|tab>", "<<", "<"}) {
    CHECK(glm_postprocess(kept) == kept);
  }
  for (int k = 0; k <= 250; ++k) {
    const std::string text = "a" + std::string(k, ' ') + "\n\tb";
    REQUIRE(glm_postprocess(glm_preprocess(text)) == text);
  }
  std::mt19937 rng(11);
  const std::vector<std::string> parts = {"<n>", "<|tab|>", "<|blank_2|>", "<|blank_8|>",
                                          "<|blank_80|>", "<|blank_81|>", "<|blank_0", "5|>",
                                          "<", "|", ">", "n", "x", "<|blank_", "<|tab", "字"};
  for (int trial = 0; trial < 2000; ++trial) {
    const std::string text = random_text(rng, parts, 12);
    REQUIRE(glm_postprocess(text) == hf_postprocess(text));
  }
}
