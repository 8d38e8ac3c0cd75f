// ROUGE-L scoring and the candidate index over a pool of texts (see rouge.h).
#include "qinggeng/gen/rouge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "gen/utf8.h"

namespace qg::gen {

namespace {

// Single characters keep their code point as id; words get ids above the Unicode range.
constexpr std::uint32_t kWordBase = 0x110000;
// Query words absent from the pool vocabulary: they cannot match any item.
constexpr std::uint32_t kUnknownWord = std::numeric_limits<std::uint32_t>::max();

bool is_ascii_alnum(char32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// Calls on_char(code point) for single-character tokens and on_word(lower-cased word) for
// ASCII words, in text order.
template <typename OnChar, typename OnWord>
void scan_tokens(std::string_view text, OnChar on_char, OnWord on_word) {
  std::string word;
  auto flush = [&] {
    if (!word.empty()) on_word(word);
    word.clear();
  };
  for (std::size_t i = 0; i < text.size();) {
    char32_t c = utf8::fold_width(utf8::next(text, i));
    if (is_ascii_alnum(c)) {
      word.push_back(static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c));
      continue;
    }
    flush();
    if (c == 0xFFFD || utf8::is_separator(c)) continue;
    on_char(c);
  }
  flush();
}

using Vocabulary = std::unordered_map<std::string, std::uint32_t>;

// Token ids of `text`. Words missing from `vocab` are added through `grow` (which aliases
// `vocab`) when given, else map to kUnknownWord.
std::vector<std::uint32_t> token_ids(std::string_view text, const Vocabulary& vocab,
                                     Vocabulary* grow) {
  std::vector<std::uint32_t> ids;
  scan_tokens(
      text, [&](char32_t c) { ids.push_back(static_cast<std::uint32_t>(c)); },
      [&](const std::string& w) {
        auto it = vocab.find(w);
        if (it != vocab.end()) {
          ids.push_back(it->second);
        } else if (grow) {
          auto id = kWordBase + static_cast<std::uint32_t>(vocab.size());
          grow->emplace(w, id);
          ids.push_back(id);
        } else {
          ids.push_back(kUnknownWord);
        }
      });
  return ids;
}

double f_measure(std::size_t lcs, std::size_t m, std::size_t n) {
  if (m == 0 || n == 0) return 0.0;
  return 2.0 * static_cast<double>(lcs) / static_cast<double>(m + n);
}

// Bit-parallel LCS (Allison-Dix / Hyyro): one bit-vector row per distinct token of the query,
// so that comparing the query with many items costs O(|item| * ceil(|query| / 64)) each.
class LcsQuery {
 public:
  explicit LcsQuery(const std::vector<std::uint32_t>& q)
      : m_(q.size()), words_((q.size() + 63) / 64) {
    for (std::size_t i = 0; i < q.size(); ++i) {
      auto [it, fresh] = row_of_.emplace(q[i], rows_.size() / std::max<std::size_t>(words_, 1));
      if (fresh) rows_.resize(rows_.size() + words_, 0);
      rows_[it->second * words_ + i / 64] |= std::uint64_t{1} << (i % 64);
    }
  }

  std::size_t lcs(const std::vector<std::uint32_t>& b) const {
    if (m_ == 0 || b.empty()) return 0;
    std::vector<std::uint64_t> v(words_, ~std::uint64_t{0});
    for (std::uint32_t t : b) {
      auto it = row_of_.find(t);
      if (it == row_of_.end()) continue;
      const std::uint64_t* match = &rows_[it->second * words_];
      std::uint64_t carry = 0;
      for (std::size_t w = 0; w < words_; ++w) {
        std::uint64_t u = v[w] & match[w];
        std::uint64_t sum = v[w] + u;
        std::uint64_t c1 = sum < v[w];
        std::uint64_t sum2 = sum + carry;
        std::uint64_t c2 = sum2 < sum;
        v[w] = sum2 | (v[w] & ~u);
        carry = c1 | c2;
      }
    }
    std::size_t ones = 0;
    for (std::size_t w = 0; w < words_; ++w) {
      std::uint64_t bits = v[w];
      std::size_t valid = std::min<std::size_t>(64, m_ - w * 64);
      if (valid < 64) bits &= (std::uint64_t{1} << valid) - 1;
      ones += static_cast<std::size_t>(__builtin_popcountll(bits));
    }
    return m_ - ones;
  }

 private:
  std::size_t m_;
  std::size_t words_;
  std::unordered_map<std::uint32_t, std::size_t> row_of_;
  std::vector<std::uint64_t> rows_;
};

// (token, count) pairs sorted by token.
using Bag = std::vector<std::pair<std::uint32_t, std::uint32_t>>;

Bag make_bag(std::vector<std::uint32_t> ids) {
  std::sort(ids.begin(), ids.end());
  Bag bag;
  for (std::uint32_t t : ids) {
    if (!bag.empty() && bag.back().first == t) {
      ++bag.back().second;
    } else {
      bag.emplace_back(t, 1);
    }
  }
  return bag;
}

std::uint32_t count_in(const Bag& bag, std::uint32_t token) {
  auto it = std::lower_bound(bag.begin(), bag.end(), std::make_pair(token, std::uint32_t{0}));
  return it != bag.end() && it->first == token ? it->second : 0;
}

}  // namespace

std::vector<std::string> rouge_tokens(std::string_view text) {
  std::vector<std::string> out;
  scan_tokens(
      text,
      [&](char32_t c) {
        std::string s;
        utf8::append(s, c);
        out.push_back(std::move(s));
      },
      [&](const std::string& w) { out.push_back(w); });
  return out;
}

std::size_t lcs_length(const std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& b) {
  return LcsQuery(a).lcs(b);
}

double rouge_l(std::string_view a, std::string_view b) {
  Vocabulary vocab;
  auto ta = token_ids(a, vocab, &vocab);
  auto tb = token_ids(b, vocab, &vocab);
  return f_measure(lcs_length(ta, tb), ta.size(), tb.size());
}

struct RougeIndex::State {
  struct Item {
    std::vector<std::uint32_t> tokens;
    Bag bag;
  };
  struct Posting {
    std::uint32_t item;
    std::uint32_t count;
  };
  Vocabulary vocab;
  std::vector<std::string> texts;
  std::vector<Item> items;
  std::unordered_map<std::uint32_t, std::vector<Posting>> postings;

  std::size_t document_frequency(std::uint32_t token) const {
    auto it = postings.find(token);
    return it == postings.end() ? 0 : it->second.size();
  }
};

RougeIndex::RougeIndex() : state_(std::make_unique<State>()) {}
RougeIndex::~RougeIndex() = default;
RougeIndex::RougeIndex(RougeIndex&&) noexcept = default;
RougeIndex& RougeIndex::operator=(RougeIndex&&) noexcept = default;

std::size_t RougeIndex::size() const { return state_->items.size(); }
const std::string& RougeIndex::text(std::size_t i) const { return state_->texts.at(i); }

std::size_t RougeIndex::add(std::string_view text) {
  State& s = *state_;
  auto index = static_cast<std::uint32_t>(s.items.size());
  State::Item item;
  item.tokens = token_ids(text, s.vocab, &s.vocab);
  item.bag = make_bag(item.tokens);
  for (auto [token, count] : item.bag) s.postings[token].push_back({index, count});
  s.items.push_back(std::move(item));
  s.texts.emplace_back(text);
  return index;
}

RougeMatch RougeIndex::best_match(std::string_view text, double min_score) const {
  const State& s = *state_;
  RougeMatch best;
  auto query = token_ids(text, s.vocab, nullptr);
  const std::size_t m = query.size();
  if (m == 0 || s.items.empty()) return best;

  Bag qbag = make_bag(query);
  qbag.erase(std::remove_if(qbag.begin(), qbag.end(),
                            [](const auto& p) { return p.first == kUnknownWord; }),
             qbag.end());
  std::sort(qbag.begin(), qbag.end(), [&](const auto& x, const auto& y) {
    return s.document_frequency(x.first) < s.document_frequency(y.first);
  });

  // Prefix filtering: an item of length n scores >= min_score only if n >= s*m/(2-s) and its
  // token overlap is >= s*(m+n)/2; items sharing none of the first `prefix` (rarest) query
  // tokens have overlap <= the remaining count, so they are skipped.
  std::size_t prefix = qbag.size();
  if (min_score > 0.0) {
    double n_min = std::ceil(min_score * static_cast<double>(m) / (2.0 - min_score) - 1e-9);
    double overlap_min = std::ceil(min_score * (static_cast<double>(m) + n_min) / 2.0 - 1e-9);
    double suffix = 0;
    prefix = qbag.size();
    while (prefix > 0 && suffix + qbag[prefix - 1].second < overlap_min) {
      suffix += qbag[prefix - 1].second;
      --prefix;
    }
  }

  std::vector<std::uint32_t> overlap(s.items.size(), 0);
  std::vector<std::uint32_t> candidates;
  for (std::size_t k = 0; k < prefix; ++k) {
    auto it = s.postings.find(qbag[k].first);
    if (it == s.postings.end()) continue;
    for (const auto& p : it->second) {
      if (overlap[p.item] == 0) candidates.push_back(p.item);
      overlap[p.item] += std::min(qbag[k].second, p.count);
    }
  }

  struct Bound {
    double bound;
    std::uint32_t item;
    bool operator<(const Bound& o) const {
      return bound < o.bound || (bound == o.bound && item > o.item);
    }
  };
  std::vector<Bound> heap;
  heap.reserve(candidates.size());
  for (std::uint32_t c : candidates) {
    std::uint32_t ov = overlap[c];
    const auto& item = s.items[c];
    for (std::size_t k = prefix; k < qbag.size(); ++k) {
      ov += std::min(qbag[k].second, count_in(item.bag, qbag[k].first));
    }
    double bound = f_measure(ov, m, item.tokens.size());
    if (bound > 0.0 && bound >= min_score) heap.push_back({bound, c});
  }
  std::make_heap(heap.begin(), heap.end());

  LcsQuery lcs(query);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    Bound top = heap.back();
    heap.pop_back();
    if (best.index >= 0 && top.bound <= best.score) break;
    const auto& item = s.items[top.item];
    double score = f_measure(lcs.lcs(item.tokens), m, item.tokens.size());
    if (best.index < 0 || score > best.score) best = {static_cast<std::ptrdiff_t>(top.item), score};
  }
  return best;
}

}  // namespace qg::gen
