// Training records, GLM layout, bucketed batch plans and the held-out split (see dataset.h).
#include "qinggeng/train/dataset.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "io/json.h"
#include "qinggeng/counter_hash.h"
#include "qinggeng/error.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/text/glm_layout.h"
#include "qinggeng/text/tokenizer.h"

namespace qg::train {

namespace {

// ---------------------------------------------------------------------------------------------
// Hashing and a portable generator: std::shuffle and the std distributions differ between
// standard libraries, and a resumed run must replay the same batches anywhere.

class Fnv1a {
 public:
  void add(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ p[i]) * 0x100000001B3ull;
  }
  void add(std::uint64_t v) {
    unsigned char bytes[8];
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(v >> (8 * i));
    add(bytes, 8);
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 0xCBF29CE484222325ull;
};

class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    const std::uint64_t z = splitmix64(state_);
    state_ += 0x9E3779B97F4A7C15ull;
    return z;
  }
  // Uniform in [0, n) without modulo bias.
  std::uint64_t below(std::uint64_t n) {
    std::uint64_t threshold = (0 - n) % n;
    for (;;) {
      std::uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

 private:
  std::uint64_t state_;
};

template <typename T>
void shuffle(std::vector<T>& v, SplitMix64& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

// ---------------------------------------------------------------------------------------------
// Reading records

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return is_space(c); });
}

bool has_value(simdjson::dom::object o, std::string_view key) {
  simdjson::dom::element v;
  return !o[key].get(v) && !v.is_null();
}

std::string required_text(simdjson::dom::object o, std::string_view key,
                          const std::string& origin) {
  std::string s = json::get_string(o, key, origin);
  QG_CHECK(!is_blank(s), origin, ": field \"", key, "\" is empty");
  return s;
}

TextExample parse_record(simdjson::dom::element e, const std::string& origin) {
  simdjson::dom::object o = json::as_object(e, origin, "record");
  TextExample ex;
  ex.origin = origin;
  bool instruction = has_value(o, "instruction");
  if (instruction && has_value(o, "question")) {
    fail(origin, ": record holds both \"question\" and \"instruction\"; keep one shape per record");
  }
  if (instruction) {
    ex.prompt = required_text(o, "instruction", origin);
    std::string input = json::optional_string(o, "input", origin).value_or("");
    if (!is_blank(input)) ex.prompt += "\n" + input;
    ex.answer = required_text(o, "output", origin);
    ex.shape = has_value(o, "request_id") ? RecordShape::kDialogue : RecordShape::kInstruction;
  } else if (has_value(o, "question")) {
    ex.prompt = required_text(o, "question", origin);
    ex.answer = required_text(o, "answer", origin);
    ex.shape = has_value(o, "passage_id") ? RecordShape::kBookQa : RecordShape::kQuestionAnswer;
  } else {
    fail(origin, ": record has neither \"question\"/\"answer\" nor \"instruction\"/\"output\"");
  }
  return ex;
}

// A piece of the input holding one record, and the line it starts on.
struct RecordText {
  std::string_view text;
  std::size_t line;
};

std::vector<RecordText> split_lines(std::string_view text, std::size_t pos) {
  std::vector<RecordText> out;
  std::size_t line = 1;
  for (std::size_t i = 0; i < pos; ++i) line += text[i] == '\n';
  while (pos < text.size()) {
    std::size_t end = std::min(text.find('\n', pos), text.size());
    std::string_view piece = text.substr(pos, end - pos);
    if (!is_blank(piece)) out.push_back({piece, line});
    pos = end + 1;
    ++line;
  }
  return out;
}

// Cuts a top-level JSON array into its elements (without parsing them), so that each record
// is parsed on its own and its errors can name the line it starts on.
std::vector<RecordText> split_array(std::string_view text, std::size_t pos,
                                    const std::string& origin) {
  std::vector<RecordText> out;
  std::size_t line = 1;
  for (std::size_t i = 0; i < pos; ++i) line += text[i] == '\n';
  auto skip_space = [&] {
    while (pos < text.size() && is_space(text[pos])) line += text[pos++] == '\n';
  };
  ++pos;  // '['
  skip_space();
  if (pos < text.size() && text[pos] == ']') {
    ++pos;
  } else {
    for (;;) {
      skip_space();
      std::size_t start = pos, start_line = line;
      int depth = 0;
      bool in_string = false;
      for (; pos < text.size(); ++pos) {
        char c = text[pos];
        if (c == '\n') ++line;
        if (in_string) {
          if (c == '\\') {
            ++pos;
          } else if (c == '"') {
            in_string = false;
          }
        } else if (c == '"') {
          in_string = true;
        } else if (c == '{' || c == '[') {
          ++depth;
        } else if (c == '}' || c == ']') {
          if (depth == 0) break;
          --depth;
        } else if (c == ',' && depth == 0) {
          break;
        }
      }
      QG_CHECK(pos < text.size(), origin, ":", start_line,
               ": invalid JSON (the array or this record is not closed)");
      std::string_view piece = text.substr(start, pos - start);
      while (!piece.empty() && is_space(piece.back())) piece.remove_suffix(1);
      QG_CHECK(!piece.empty(), origin, ":", start_line, ": invalid JSON (empty array element)");
      out.push_back({piece, start_line});
      if (text[pos++] == ']') break;
    }
  }
  skip_space();
  QG_CHECK(pos == text.size(), origin, ":", line, ": invalid JSON (text after the array)");
  return out;
}

}  // namespace

const char* shape_name(RecordShape shape) {
  switch (shape) {
    case RecordShape::kQuestionAnswer:
      return "question_answer";
    case RecordShape::kBookQa:
      return "book_qa";
    case RecordShape::kInstruction:
      return "instruction";
    case RecordShape::kDialogue:
      return "dialogue";
  }
  return "unknown";
}

std::vector<TextExample> parse_text_examples(std::string_view text, const std::string& origin) {
  std::size_t pos = text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;  // UTF-8 byte order mark
  while (pos < text.size() && is_space(text[pos])) ++pos;
  bool array = pos < text.size() && text[pos] == '[';
  std::vector<RecordText> records = array ? split_array(text, pos, origin) : split_lines(text, pos);
  simdjson::dom::parser parser;
  std::vector<TextExample> out;
  out.reserve(records.size());
  for (const RecordText& r : records) {
    std::string where = origin + ":" + std::to_string(r.line);
    simdjson::dom::element e;
    if (auto err = parser.parse(simdjson::padded_string(r.text)).get(e)) {
      fail(where, ": invalid JSON (", simdjson::error_message(err), ")");
    }
    out.push_back(parse_record(e, where));
  }
  return out;
}

std::vector<TextExample> load_text_examples(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open training data");
  std::ostringstream buf;
  buf << in.rdbuf();
  std::vector<TextExample> out = parse_text_examples(buf.str(), file.string());
  QG_CHECK(!out.empty(), file.string(), ": no training records");
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layout

std::vector<int> TrainingExample::next_token_targets() const {
  std::vector<int> out(labels.size(), kIgnoreLabel);
  if (!labels.empty()) std::copy(labels.begin() + 1, labels.end(), out.begin());
  return out;
}

int TrainingExample::scored_tokens() const {
  return static_cast<int>(
      std::count_if(labels.begin(), labels.end(), [](int l) { return l != kIgnoreLabel; }));
}

TrainingExample layout_example(const std::vector<int>& prompt_ids,
                               const std::vector<int>& answer_ids, const io::ModelConfig& config,
                               const LayoutOptions& options) {
  const int max_len = options.max_length;
  QG_CHECK(max_len >= 3, "training layout: max length must be >= 3 (got ", max_len, ")");
  const int full_prompt = static_cast<int>(prompt_ids.size());
  const int full_answer = static_cast<int>(answer_ids.size());
  int p = full_prompt, a = full_answer;
  bool eop = true;
  if (p + a + 3 > max_len) {
    int floor = std::min({full_prompt, std::max(options.min_prompt_tokens, 0), max_len - 3});
    p = std::max(floor, max_len - 3 - full_answer);
    if (p + a + 3 > max_len) {
      eop = false;
      a = max_len - 2 - p;  // >= 1 because p <= max_len - 3
    }
  }
  TrainingExample ex;
  ex.prompt_tokens_dropped = full_prompt - p;
  ex.answer_tokens_dropped = full_answer - a;
  auto& ids = ex.input_ids;
  ids.reserve(static_cast<std::size_t>(p + a + 3));
  auto prompt_begin =
      prompt_ids.begin() +
      (options.prompt_truncation == PromptTruncation::kKeepEnd ? full_prompt - p : 0);
  ids.insert(ids.end(), prompt_begin, prompt_begin + p);
  ids.push_back(options.use_gmask ? config.gmask_token_id : config.mask_token_id);
  ids.push_back(config.bos_token_id);
  ids.insert(ids.end(), answer_ids.begin(), answer_ids.begin() + a);
  if (eop) ids.push_back(config.eos_token_id);

  ex.mask_position = p;
  ex.context_length = p + 1;
  text::GlmLayout layout{ex.context_length, ex.mask_position};
  const int n = ex.size();
  ex.labels.resize(static_cast<std::size_t>(n));
  ex.position_ids.resize(static_cast<std::size_t>(n));
  ex.block_position_ids.resize(static_cast<std::size_t>(n));
  for (int t = 0; t < n; ++t) {
    auto i = static_cast<std::size_t>(t);
    ex.labels[i] = t <= ex.context_length ? kIgnoreLabel : ids[i];
    ex.position_ids[i] = layout.position(t);
    ex.block_position_ids[i] = layout.block_position(t);
  }
  return ex;
}

TrainingExample make_training_example(const TextExample& example,
                                      const text::ChatGlmTokenizer& tokenizer,
                                      const io::ModelConfig& config, const LayoutOptions& options) {
  return layout_example(tokenizer.encode(example.prompt), tokenizer.encode(example.answer), config,
                        options);
}

// ---------------------------------------------------------------------------------------------
// Batches

std::string DataPosition::to_json() const {
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(fingerprint));
  return "{\"epoch\":" + std::to_string(epoch) + ",\"batch\":" + std::to_string(batch) +
         ",\"fingerprint\":\"" + hex + "\"}";
}

DataPosition DataPosition::from_json(std::string_view text, const std::string& origin) {
  json::Document doc = json::Document::parse(text, origin);
  simdjson::dom::object o = json::as_object(doc.root(), origin, "data position");
  DataPosition pos;
  std::int64_t epoch = json::get_int(o, "epoch", origin);
  std::int64_t batch = json::get_int(o, "batch", origin);
  QG_CHECK(epoch >= 0, origin, ": field \"epoch\" must be >= 0");
  QG_CHECK(batch >= 0, origin, ": field \"batch\" must be >= 0");
  pos.epoch = static_cast<std::uint64_t>(epoch);
  pos.batch = static_cast<std::uint64_t>(batch);
  std::string hex = json::get_string(o, "fingerprint", origin);
  std::size_t used = 0;
  bool ok =
      hex.size() == 16 && hex.find_first_not_of("0123456789abcdefABCDEF") == std::string::npos;
  if (ok) pos.fingerprint = std::stoull(hex, &used, 16);
  QG_CHECK(ok && used == 16, origin, ": field \"fingerprint\" must be 16 hex digits");
  return pos;
}

PaddingStats padding_stats(const std::vector<std::vector<std::size_t>>& batches,
                           const std::vector<int>& lengths) {
  PaddingStats s;
  for (const auto& b : batches) {
    std::size_t longest = 0;
    for (std::size_t i : b) {
      QG_CHECK(i < lengths.size(), "padding stats: example index ", i, " out of range");
      auto len = static_cast<std::size_t>(lengths[i]);
      s.real_tokens += len;
      longest = std::max(longest, len);
    }
    s.padded_tokens += longest * b.size();
    s.examples += b.size();
    ++s.batches;
  }
  return s;
}

BatchPlanner::BatchPlanner(std::vector<int> lengths, const BatchPlanOptions& options)
    : lengths_(std::move(lengths)), options_(options) {
  QG_CHECK(!lengths_.empty(), "batch plan: no training examples");
  QG_CHECK(options_.batch_size > 0 || options_.max_tokens > 0,
           "batch plan: give a batch size or a token budget");
  if (options_.bucket_examples == 0) options_.bucket_examples = 1;
  Fnv1a h;
  for (int len : lengths_) {
    QG_CHECK(len >= 1, "batch plan: example length must be >= 1 (got ", len, ")");
    h.add(static_cast<std::uint64_t>(len));
  }
  h.add(options_.max_tokens);
  h.add(options_.batch_size);
  h.add(options_.bucket_examples);
  h.add(options_.seed);
  fingerprint_ = h.value();
}

std::vector<std::vector<std::size_t>> BatchPlanner::epoch_batches(std::uint64_t epoch) const {
  SplitMix64 rng(splitmix64(options_.seed) ^ splitmix64(~epoch));
  std::vector<std::size_t> order(lengths_.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  shuffle(order, rng);

  // Whole batches per bucket when the batch size is fixed, so only the epoch's last batch can
  // be short.
  std::size_t bucket = options_.bucket_examples;
  if (options_.batch_size > 0) {
    bucket = (bucket + options_.batch_size - 1) / options_.batch_size * options_.batch_size;
  }
  std::vector<std::vector<std::size_t>> batches;
  for (std::size_t first = 0; first < order.size(); first += bucket) {
    auto begin = order.begin() + static_cast<std::ptrdiff_t>(first);
    auto end = order.begin() + static_cast<std::ptrdiff_t>(std::min(first + bucket, order.size()));
    std::stable_sort(begin, end,
                     [&](std::size_t x, std::size_t y) { return lengths_[x] < lengths_[y]; });
    std::vector<std::size_t> current;
    std::size_t longest = 0;
    for (auto it = begin; it != end; ++it) {
      auto len = static_cast<std::size_t>(lengths_[*it]);
      std::size_t rows = current.size() + 1;
      bool too_many = options_.batch_size > 0 && rows > options_.batch_size;
      bool too_big = options_.max_tokens > 0 && rows * std::max(longest, len) > options_.max_tokens;
      if (!current.empty() && (too_many || too_big)) {
        batches.push_back(std::move(current));
        current.clear();
        longest = 0;
      }
      current.push_back(*it);
      longest = std::max(longest, len);
    }
    if (!current.empty()) batches.push_back(std::move(current));
  }
  // Sorted buckets would otherwise feed short batches first and long ones last.
  shuffle(batches, rng);
  return batches;
}

std::vector<std::size_t> BatchPlanner::next(DataPosition& position) {
  QG_CHECK(position.fingerprint == fingerprint_,
           "data position belongs to another batch plan (the training data, its order, the "
           "layout or the batch options changed since it was saved)");
  if (cached_epoch_ != position.epoch) {
    cached_ = epoch_batches(position.epoch);
    cached_epoch_ = position.epoch;
  }
  QG_CHECK(position.batch < cached_.size(), "data position: batch ", position.batch,
           " is past the end of epoch ", position.epoch, " (", cached_.size(), " batches)");
  std::vector<std::size_t> batch = cached_[position.batch];
  if (++position.batch == cached_.size()) {
    ++position.epoch;
    position.batch = 0;
  }
  return batch;
}

// ---------------------------------------------------------------------------------------------
// Held-out split

DataSplit split_examples(const std::vector<TextExample>& examples, const SplitOptions& options) {
  QG_CHECK(options.fraction >= 0.0 && options.fraction < 1.0,
           "held-out split: fraction must be in [0, 1) (got ", options.fraction, ")");
  QG_CHECK(options.count < examples.size() || (options.count == 0 && !examples.empty()),
           "held-out split: holding out ", options.count, " of ", examples.size(),
           " examples leaves none to train on");
  std::vector<std::uint64_t> keys(examples.size());
  for (std::size_t i = 0; i < examples.size(); ++i) {
    Fnv1a h;
    h.add(examples[i].prompt.data(), examples[i].prompt.size());
    h.add(std::uint64_t{0x1F});  // separates prompt and answer: ("ab","c") != ("a","bc")
    h.add(examples[i].answer.data(), examples[i].answer.size());
    keys[i] = splitmix64(h.value() ^ splitmix64(options.seed));
  }
  std::vector<bool> held(examples.size(), false);
  if (options.count > 0) {
    std::vector<std::size_t> order(examples.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
      return keys[x] != keys[y] ? keys[x] < keys[y] : x < y;
    });
    std::size_t k = options.count;
    while (k < order.size() && keys[order[k]] == keys[order[k - 1]]) ++k;  // duplicates follow
    for (std::size_t j = 0; j < k; ++j) held[order[j]] = true;
  } else {
    // The top 53 bits as a fraction in [0, 1).
    for (std::size_t i = 0; i < keys.size(); ++i) {
      held[i] = static_cast<double>(keys[i] >> 11) * 0x1.0p-53 < options.fraction;
    }
  }
  DataSplit split;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    (held[i] ? split.held_out : split.train).push_back(i);
  }
  QG_CHECK(!split.train.empty(), "held-out split: fraction ", options.fraction,
           " leaves no example to train on");
  return split;
}

}  // namespace qg::train
