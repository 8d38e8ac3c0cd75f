// Perplexity of text and of question/answer records under a ChatGLM model, scored the way
// the model is trained and used: the text is the "answer" to an empty or given prompt.
//
//   plain text:    [gMASK] <sop> text <eop>                 (targets: text and <eop>)
//   q/a record:    q [gMASK] <sop> answer <eop>             (targets: answer and <eop>)
// Text longer than the model's window is scored in consecutive windows.
#pragma once

#include <filesystem>
#include <functional>
#include <string_view>

#include "qinggeng/engine/generator.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/tokenizer.h"

namespace qg::engine {

/// \brief Log-likelihood of a plain text (in windows of at most max_sequence_length tokens).
LogLikelihood text_log_likelihood(const model::GlmModel& model,
                                  const text::ChatGlmTokenizer& tokenizer, std::string_view text);

/// \brief Log-likelihood of `answer` (and <eop>) given `prompt`.
/// \throws qg::Error when prompt + answer exceed max_sequence_length.
LogLikelihood answer_log_likelihood(const model::GlmModel& model,
                                    const text::ChatGlmTokenizer& tokenizer,
                                    std::string_view prompt, std::string_view answer);

/// \brief Sums the log-likelihood of every record of a JSONL file. Each line is an object with
/// "text" (plain text), or "question"/"answer", or "instruction"/"input"/"output" (prompt is
/// instruction + "\n" + input when input is non-empty). Blank lines are skipped.
/// \param on_record called after each record with (records done, running total).
/// \throws qg::Error naming the file and line for invalid JSON or a record of none of these shapes.
LogLikelihood jsonl_log_likelihood(
    const model::GlmModel& model, const text::ChatGlmTokenizer& tokenizer,
    const std::filesystem::path& file,
    const std::function<void(long long, const LogLikelihood&)>& on_record = {});

}  // namespace qg::engine
