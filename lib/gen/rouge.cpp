// ROUGE-L scoring and the candidate index over a pool of texts (see rouge.h).
#include "qinggeng/gen/rouge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "gen/utf8.h"

namespace qg::gen {

namespace {

// Tokens of an unknown word in a query: they cannot match any pool item.
constexpr std::uint32_t kUnknown = std::numeric_limits<std::uint32_t>::max();

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

// Dense token ids (0, 1, 2, ... in order of first appearance) for characters and words, so
// per-query tables can be plain arrays indexed by token.
struct Vocabulary {
  std::unordered_map<char32_t, std::uint32_t> chars;
  std::unordered_map<std::string, std::uint32_t> words;
  std::uint32_t size = 0;

  template <typename Map, typename Key>
  std::uint32_t lookup(const Map& map, const Key& key) const {
    auto it = map.find(key);
    return it == map.end() ? kUnknown : it->second;
  }
  template <typename Map, typename Key>
  std::uint32_t insert(Map& map, const Key& key) {
    return map.emplace(key, size).second ? size++ : map.at(key);
  }
};

// Token ids of `text`. Tokens missing from `vocab` are added through `grow` (which aliases
// `vocab`) when given, else map to kUnknown.
std::vector<std::uint32_t> token_ids(std::string_view text, const Vocabulary& vocab,
                                     Vocabulary* grow) {
  std::vector<std::uint32_t> ids;
  scan_tokens(
      text,
      [&](char32_t c) {
        ids.push_back(grow ? grow->insert(grow->chars, c) : vocab.lookup(vocab.chars, c));
      },
      [&](const std::string& w) {
        ids.push_back(grow ? grow->insert(grow->words, w) : vocab.lookup(vocab.words, w));
      });
  return ids;
}

double f_measure(std::size_t lcs, std::size_t m, std::size_t n) {
  if (m == 0 || n == 0) return 0.0;
  return 2.0 * static_cast<double>(lcs) / static_cast<double>(m + n);
}

// Bit-parallel LCS (Allison-Dix / Hyyro): one bit-vector row per distinct token of the query,
// so that comparing the query with many items costs O(|item| * ceil(|query| / 64)) each.
// `row_of` maps token id -> row (-1: not in the query); it must cover every id passed to lcs()
// and is restored to all -1 when the query is destroyed.
class LcsQuery {
 public:
  LcsQuery(const std::vector<std::uint32_t>& q, std::vector<std::int32_t>& row_of)
      : m_(q.size()), words_((q.size() + 63) / 64), row_of_(row_of) {
    for (std::size_t i = 0; i < q.size(); ++i) {
      if (q[i] == kUnknown) continue;
      std::int32_t& row = row_of_[q[i]];
      if (row < 0) {
        row = static_cast<std::int32_t>(rows_.size() / words_);
        rows_.resize(rows_.size() + words_, 0);
        touched_.push_back(q[i]);
      }
      rows_[static_cast<std::size_t>(row) * words_ + i / 64] |= std::uint64_t{1} << (i % 64);
    }
    v_.resize(words_);
  }
  ~LcsQuery() {
    for (std::uint32_t t : touched_) row_of_[t] = -1;
  }
  LcsQuery(const LcsQuery&) = delete;
  LcsQuery& operator=(const LcsQuery&) = delete;

  std::size_t lcs(const std::vector<std::uint32_t>& b) {
    if (m_ == 0 || b.empty()) return 0;
    std::fill(v_.begin(), v_.end(), ~std::uint64_t{0});
    for (std::uint32_t t : b) {
      std::int32_t row = t == kUnknown ? -1 : row_of_[t];
      if (row < 0) continue;
      const std::uint64_t* match = &rows_[static_cast<std::size_t>(row) * words_];
      std::uint64_t carry = 0;
      for (std::size_t w = 0; w < words_; ++w) {
        std::uint64_t u = v_[w] & match[w];
        std::uint64_t sum = v_[w] + u;
        std::uint64_t c1 = sum < v_[w];
        std::uint64_t sum2 = sum + carry;
        std::uint64_t c2 = sum2 < sum;
        v_[w] = sum2 | (v_[w] & ~u);
        carry = c1 | c2;
      }
    }
    std::size_t ones = 0;
    for (std::size_t w = 0; w < words_; ++w) {
      std::uint64_t bits = v_[w];
      std::size_t valid = std::min<std::size_t>(64, m_ - w * 64);
      if (valid < 64) bits &= (std::uint64_t{1} << valid) - 1;
      ones += static_cast<std::size_t>(__builtin_popcountll(bits));
    }
    return m_ - ones;
  }

 private:
  std::size_t m_;
  std::size_t words_;
  std::vector<std::int32_t>& row_of_;
  std::vector<std::uint32_t> touched_;
  std::vector<std::uint64_t> rows_;
  std::vector<std::uint64_t> v_;
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
  std::uint32_t top = 0;
  for (auto t : a) top = std::max(top, t + 1);
  for (auto t : b) top = std::max(top, t + 1);
  std::vector<std::int32_t> row_of(top, -1);
  return LcsQuery(a, row_of).lcs(b);
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
  std::vector<std::int32_t> row_of;  // LcsQuery scratch, one entry per vocabulary token
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
  s.row_of.resize(s.vocab.size, -1);
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
                            [](const auto& p) { return p.first == kUnknown; }),
             qbag.end());
  std::sort(qbag.begin(), qbag.end(), [&](const auto& x, const auto& y) {
    return s.document_frequency(x.first) < s.document_frequency(y.first);
  });

  // Prefix filtering: an item of length n scores >= min_score only if n >= s*m/(2-s) and its
  // token overlap is >= s*(m+n)/2; items sharing none of the first `prefix` (rarest) query
  // tokens have overlap <= the remaining count, so they are skipped.
  std::size_t prefix = qbag.size();
  std::uint32_t suffix_total = 0;  // query tokens outside the prefix
  if (min_score > 0.0) {
    double n_min = std::ceil(min_score * static_cast<double>(m) / (2.0 - min_score) - 1e-9);
    double overlap_min = std::ceil(min_score * (static_cast<double>(m) + n_min) / 2.0 - 1e-9);
    double suffix = 0;
    prefix = qbag.size();
    while (prefix > 0 && suffix + qbag[prefix - 1].second < overlap_min) {
      suffix += qbag[prefix - 1].second;
      --prefix;
    }
    suffix_total = static_cast<std::uint32_t>(suffix);
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
    // Cheap bound first: every suffix token matching. Most candidates share one rare token
    // and stop here, before the per-token lookups below.
    if (f_measure(ov + suffix_total, m, item.tokens.size()) < min_score) continue;
    for (std::size_t k = prefix; k < qbag.size(); ++k) {
      ov += std::min(qbag[k].second, count_in(item.bag, qbag[k].first));
    }
    double bound = f_measure(ov, m, item.tokens.size());
    if (bound > 0.0 && bound >= min_score) heap.push_back({bound, c});
  }
  std::make_heap(heap.begin(), heap.end());

  // Scratch table restored by ~LcsQuery: the pool itself is not modified.
  LcsQuery lcs(query, state_->row_of);
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
