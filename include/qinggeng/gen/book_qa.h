// Passage-grounded question answering data: ask for questions about each passage, deduplicate
// them (per passage and across the run, ROUGE-L), answer every question with the passage in
// the prompt, optionally ask whether the passage supports the answer, and append the pairs to
// a JSONL file that a rerun resumes from.
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/gen/cancellation.h"
#include "qinggeng/gen/chat_client.h"
#include "qinggeng/gen/passages.h"
#include "qinggeng/gen/progress.h"
#include "qinggeng/gen/prompt_template.h"

namespace qg::gen {

/// \brief The questions in a model reply, one per line, with list markers stripped (digits
/// inside a question are kept). Lines without Chinese, headings ending in a colon, and exact
/// repeats are skipped.
std::vector<std::string> parse_questions(std::string_view reply);

/// \brief True when a support-check reply says yes ("是", "是的", "Yes").
bool parse_support_verdict(std::string_view reply);

/// \brief Settings of a book QA run.
struct BookQaOptions {
  std::filesystem::path output;       ///< JSONL; its state file is output + ".state.jsonl"
  std::size_t target = 0;             ///< stop at this many QA pairs (0: all passages)
  int workers = 4;                    ///< passages processed concurrently
  int questions_per_passage = 5;
  bool support_check = false;         ///< one extra request per answer
  double passage_threshold = 0.7;     ///< ROUGE-L dedup among one passage's questions
  double global_threshold = 0.9;      ///< ROUGE-L dedup against every question so far
  std::string unanswerable_marker = "资料未提及";  ///< answers containing it are dropped
  TemplateSource question_prompt;     ///< empty text: default_question_template()
  TemplateSource answer_prompt;       ///< empty text: default_answer_template()
  TemplateSource support_prompt;      ///< empty text: default_support_template()
  int max_consecutive_errors = 10;
};

/// \brief Runs book QA generation against a ChatClient.
///
/// Output records: {"passage_id","passage","question","answer","model"}. A state file
/// (output + ".state.jsonl") records each passage's accepted questions and the questions
/// dropped (unanswerable, unsupported), so a rerun asks no passage twice and answers exactly
/// the questions not yet written.
class BookQaGenerator {
 public:
  BookQaGenerator(ChatClient& client, std::vector<Passage> passages, BookQaOptions options);
  ~BookQaGenerator();

  /// \brief Processes passages until all are done, the target is reached, cancellation, or a
  /// fatal API error (rethrown; finished records stay written). Returns the QA pairs in the
  /// output.
  std::size_t run(Cancellation& cancel);

  const GenStats& stats() const { return stats_; }

  /// \brief The state file used next to `output`.
  static std::filesystem::path state_path(const std::filesystem::path& output);

 private:
  struct State;
  ChatClient& client_;
  BookQaOptions options_;
  GenStats stats_;
  std::unique_ptr<State> state_;
};

}  // namespace qg::gen
