// ROUGE-L: tokenisation, hand-computed scores (Chinese, English, mixed), the bit-parallel LCS
// against a plain DP, and the index against naive all-pairs search.
#include <random>

#include "catch.hpp"
#include "qinggeng/gen/rouge.h"

#if defined(QG_CATCH3)
using Catch::Approx;
#endif

using namespace qg::gen;

namespace {
std::size_t lcs_dp(const std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = a[i - 1] == b[j - 1] ? d[i - 1][j - 1] + 1 : std::max(d[i - 1][j], d[i][j - 1]);
    }
  }
  return d[a.size()][b.size()];
}
}  // namespace

TEST_CASE("rouge tokens: CJK characters, ASCII words, punctuation dropped", "[gen][rouge]") {
  CHECK(rouge_tokens("高血压，怎么办？") ==
        std::vector<std::string>{"高", "血", "压", "怎", "么", "办"});
  CHECK(rouge_tokens("血压120/80mmHg正常吗") ==
        std::vector<std::string>{"血", "压", "120", "80mmhg", "正", "常", "吗"});
  CHECK(rouge_tokens("Take ＡＢＣ tablets!") == std::vector<std::string>{"take", "abc", "tablets"});
  CHECK(rouge_tokens("  。，！ ").empty());
}

TEST_CASE("rouge-L on hand-computed cases", "[gen][rouge]") {
  // Identical and disjoint.
  CHECK(rouge_l("高血压的症状", "高血压的症状") == Approx(1.0));
  CHECK(rouge_l("感冒", "骨折") == Approx(0.0));
  CHECK(rouge_l("", "骨折") == 0.0);
  // 高血压怎么治疗 (7) vs 高血压如何治疗 (7): LCS 高血压治疗 = 5 -> F = 10/14.
  CHECK(rouge_l("高血压怎么治疗", "高血压如何治疗") == Approx(10.0 / 14.0));
  // 糖尿病饮食 (5) vs 糖尿病患者的饮食建议 (10): LCS 5 -> F = 10/15.
  CHECK(rouge_l("糖尿病饮食", "糖尿病患者的饮食建议") == Approx(10.0 / 15.0));
  // Order matters: 甲乙丙丁 vs 丁丙乙甲: LCS 1 -> F = 2/8.
  CHECK(rouge_l("甲乙丙丁", "丁丙乙甲") == Approx(0.25));
  // Words: "the cat sat on the mat" (6) vs "the cat on mat" (4): LCS 4 -> 8/10.
  CHECK(rouge_l("the cat sat on the mat", "the cat on mat") == Approx(0.8));
  // Mixed: 服用 aspirin 100 mg (5 tokens) vs 服用 aspirin 50 mg (5): LCS 4 -> 8/10.
  CHECK(rouge_l("服用aspirin 100 mg", "服用 Aspirin 50 mg") == Approx(0.8));
  // Punctuation does not count: 你好，世界 vs 你好世界.
  CHECK(rouge_l("你好，世界", "你好世界") == Approx(1.0));
}

TEST_CASE("bit-parallel LCS equals the DP on random sequences", "[gen][rouge]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::uniform_int_distribution<int> len(0, trial < 200 ? 40 : 150);
    std::uniform_int_distribution<std::uint32_t> sym(0, trial % 3 == 0 ? 2 : 12);
    std::vector<std::uint32_t> a(len(rng)), b(len(rng));
    for (auto& x : a) x = sym(rng);
    for (auto& x : b) x = sym(rng);
    REQUIRE(lcs_length(a, b) == lcs_dp(a, b));
  }
}

TEST_CASE("rouge index agrees with naive all-pairs search", "[gen][rouge]") {
  std::mt19937 rng(11);
  // Small alphabet of Chinese characters and a few words, so that matches are frequent.
  const std::vector<std::string> alphabet = {"高", "血", "压", "糖", "尿", "病", "心", "肺",
                                             "肝", "肾", "药", "痛", " fever ", " dose "};
  auto random_text = [&](int max_len) {
    std::uniform_int_distribution<int> len(1, max_len);
    std::uniform_int_distribution<std::size_t> pick(0, alphabet.size() - 1);
    std::string s;
    for (int i = len(rng); i > 0; --i) s += alphabet[pick(rng)];
    return s;
  };
  RougeIndex index;
  std::vector<std::string> pool;
  for (int i = 0; i < 300; ++i) {
    pool.push_back(random_text(i % 10 == 0 ? 70 : 14));
    index.add(pool.back());
  }
  CHECK(index.size() == 300);
  CHECK(index.text(5) == pool[5]);
  for (int q = 0; q < 200; ++q) {
    std::string query = q % 4 == 0 ? pool[static_cast<std::size_t>(q)] : random_text(14);
    double naive = 0;
    for (const auto& p : pool) naive = std::max(naive, rouge_l(query, p));
    RougeMatch exact = index.best_match(query);
    REQUIRE(exact.score == Approx(naive));
    if (exact.index >= 0) REQUIRE(rouge_l(query, pool[exact.index]) == Approx(exact.score));
    for (double threshold : {0.3, 0.5, 0.7}) {
      RougeMatch m = index.best_match(query, threshold);
      if (naive >= threshold) {
        REQUIRE(m.score == Approx(naive));
      } else {
        REQUIRE(m.score < threshold);
      }
    }
  }
  // Words never seen by the index cannot match anything.
  CHECK(index.best_match("unknownword").index == -1);
  CHECK(RougeIndex().best_match("高血压").index == -1);
}
