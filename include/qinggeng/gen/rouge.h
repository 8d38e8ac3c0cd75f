// ROUGE-L similarity for Chinese and mixed text, and an index that finds the most similar item
// of a large pool without comparing against every item.
//
// Tokenisation: every CJK character (and any other non-ASCII letter) is one token; runs of
// ASCII letters/digits form one lower-cased word token; whitespace and punctuation (ASCII,
// CJK and full-width) separate tokens and are dropped. The usual ROUGE tokenizer keeps only
// [a-z0-9] and so scores any two Chinese sentences 0; this one does not.
// Score: LCS-based F-measure, F = 2·LCS / (|a| + |b|) (precision and recall weighted equally);
// 0 when either side has no tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace qg::gen {

/// \brief The ROUGE-L tokens of `text`, as UTF-8 strings (for inspection and tests).
std::vector<std::string> rouge_tokens(std::string_view text);

/// \brief ROUGE-L F-measure between two texts, in [0, 1].
double rouge_l(std::string_view a, std::string_view b);

/// \brief Length of the longest common subsequence of two token-id sequences (bit-parallel).
std::size_t lcs_length(const std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& b);

/// \brief Result of a similarity search: the pool item (index, -1 if none) and its score.
struct RougeMatch {
  std::ptrdiff_t index = -1;
  double score = 0.0;
};

/// \brief A growing pool of texts supporting "most similar item" queries by ROUGE-L.
///
/// An inverted index over tokens gives, for each candidate, an upper bound on its LCS (the
/// multiset overlap of tokens); exact LCS is computed only for candidates, best bound first,
/// until the bound cannot beat the best score found. With `min_score` > 0 only the query's
/// rarest tokens are looked up (prefix filtering): an item sharing none of them cannot reach
/// `min_score`. Not thread-safe; callers serialise access.
class RougeIndex {
 public:
  RougeIndex();
  ~RougeIndex();
  RougeIndex(RougeIndex&&) noexcept;
  RougeIndex& operator=(RougeIndex&&) noexcept;

  /// \brief Adds `text` to the pool and returns its index.
  std::size_t add(std::string_view text);
  /// \brief Number of items in the pool.
  std::size_t size() const;
  /// \brief The text of item `i`.
  const std::string& text(std::size_t i) const;

  /// \brief The pool item most similar to `text`.
  ///
  /// Exact (same score as comparing with every item) whenever the best score is at least
  /// `min_score`; when no item reaches `min_score` the result has a score below it (possibly
  /// index -1). `min_score` = 0 always searches exhaustively through the index.
  RougeMatch best_match(std::string_view text, double min_score = 0.0) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace qg::gen
