// ChatSession: a multi-turn conversation with a ChatGLM model — builds the v1 prompt from the
// history, generates, streams the reply text as it grows (never splitting a UTF-8 character),
// and keeps the exchange in the history. Oldest rounds are dropped when the prompt would not
// leave room to answer under max_length.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/engine/generator.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/chat_template.h"
#include "qinggeng/text/tokenizer.h"

namespace qg::engine {

/// \brief Settings of a chat (defaults: the ChatGLM-6B reference chat).
struct ChatOptions {
  GenerationConfig generation;                        ///< max_length 2048, top_p 0.7, T 0.95
  text::ChatTemplate style = text::ChatTemplate::Round0;
  int min_answer_tokens = 64;  ///< history is trimmed so at least this many tokens fit
};

/// \brief Receives reply text as it is generated; return false to stop generating.
using TextCallback = std::function<bool(std::string_view piece)>;

/// \brief Turns a stream of token ids into a stream of text pieces.
///
/// Decodes everything generated so far and emits only what is new, holding back a trailing
/// incomplete UTF-8 sequence or replacement character until the next token completes it.
class TextStreamer {
 public:
  explicit TextStreamer(const text::ChatGlmTokenizer& tokenizer) : tokenizer_(tokenizer) {}
  /// \brief Adds a token; returns the newly completed text (may be empty).
  std::string push(int token);
  /// \brief Returns whatever is still held back (call once at the end).
  std::string finish();
  /// \brief All text decoded so far.
  const std::string& text() const { return decoded_; }

 private:
  const text::ChatGlmTokenizer& tokenizer_;
  std::vector<int> tokens_;
  std::string decoded_;
  std::size_t emitted_ = 0;
};

/// \brief A conversation with history.
class ChatSession {
 public:
  ChatSession(const model::GlmModel& model, const text::ChatGlmTokenizer& tokenizer,
              ChatOptions options = {});

  /// \brief Answers `query`, streaming the text to `on_text`, and records the exchange.
  /// \returns the whole reply (whitespace-trimmed).
  std::string reply(std::string_view query, const TextCallback& on_text = {});
  /// \brief Forgets the history.
  void reset() { history_.clear(); }

  const std::vector<text::ChatTurn>& history() const { return history_; }
  ChatOptions& options() { return options_; }
  /// \brief Why the last reply stopped.
  FinishReason last_finish_reason() const { return last_reason_; }
  /// \brief Token ids of the prompt for `query` given the current history (after trimming).
  std::vector<int> prompt_ids(std::string_view query);

 private:
  const model::GlmModel& model_;
  const text::ChatGlmTokenizer& tokenizer_;
  ChatOptions options_;
  std::vector<text::ChatTurn> history_;
  FinishReason last_reason_ = FinishReason::Eos;
};

}  // namespace qg::engine
