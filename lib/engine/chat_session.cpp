// ChatSession and TextStreamer (see include/qinggeng/engine/chat_session.h).
#include "qinggeng/engine/chat_session.h"

#include <algorithm>

#include "qinggeng/error.h"

namespace qg::engine {
namespace {

// Length of the longest prefix of `s` that ends on a complete UTF-8 character and not on a
// U+FFFD replacement character (which a byte-fallback decode produces for a partial sequence).
std::size_t complete_prefix(const std::string& s) {
  std::size_t end = s.size();
  // Back up over a trailing partial multi-byte sequence.
  std::size_t i = end;
  int continuation = 0;
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80 && continuation < 3) {
    --i;
    ++continuation;
  }
  if (i > 0) {
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    const int need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (need > continuation) end = i - 1;
  }
  static const std::string kReplacement = "\xEF\xBF\xBD";
  while (end >= 3 && s.compare(end - 3, 3, kReplacement) == 0) end -= 3;
  return end;
}

std::string trim(std::string s) {
  const char* ws = " \t\r\n";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace

std::string TextStreamer::push(int token) {
  tokens_.push_back(token);
  decoded_ = tokenizer_.decode(tokens_);
  const std::size_t ready = std::max(emitted_, complete_prefix(decoded_));
  std::string piece = decoded_.substr(emitted_, ready - emitted_);
  emitted_ = ready;
  return piece;
}

std::string TextStreamer::finish() {
  std::string rest = emitted_ < decoded_.size() ? decoded_.substr(emitted_) : std::string();
  emitted_ = decoded_.size();
  return rest;
}

ChatSession::ChatSession(const model::GlmModel& model, const text::ChatGlmTokenizer& tokenizer,
                         ChatOptions options)
    : model_(model), tokenizer_(tokenizer), options_(std::move(options)) {}

std::vector<int> ChatSession::prompt_ids(std::string_view query) {
  const int max_length =
      std::min<int>(options_.generation.max_length, static_cast<int>(model_.config().max_sequence_length));
  const int room = std::min(options_.min_answer_tokens, std::max(1, max_length / 4));
  for (;;) {
    auto ids = tokenizer_.encode(text::build_chat_prompt(history_, query, options_.style));
    ids.push_back(model_.config().gmask_token_id);
    ids.push_back(model_.config().bos_token_id);
    if (static_cast<int>(ids.size()) + room <= max_length) return ids;
    QG_CHECK(!history_.empty(), "chat: the question alone is ", ids.size(),
             " tokens, which leaves no room to answer under the maximum length ", max_length);
    history_.erase(history_.begin());  // drop the oldest round and try again
  }
}

std::string ChatSession::reply(std::string_view query, const TextCallback& on_text) {
  const auto prompt = prompt_ids(query);
  TextStreamer streamer(tokenizer_);
  bool keep_going = true;
  auto on_token = [&](int token) {
    const std::string piece = streamer.push(token);
    if (on_text && !piece.empty()) keep_going = on_text(piece);
    return keep_going;
  };
  const auto result = generate(model_, prompt, options_.generation, on_token);
  last_reason_ = result.reason;
  const std::string rest = streamer.finish();
  if (on_text && !rest.empty() && keep_going) on_text(rest);
  std::string answer = trim(streamer.text());
  history_.emplace_back(std::string(query), answer);
  return answer;
}

}  // namespace qg::engine
