// Perplexity of texts and JSONL records (see include/qinggeng/engine/perplexity.h).
#include "qinggeng/engine/perplexity.h"

#include <algorithm>
#include <fstream>

#include "io/json.h"
#include "qinggeng/error.h"

namespace qg::engine {

LogLikelihood text_log_likelihood(const model::GlmModel& model,
                                  const text::ChatGlmTokenizer& tokenizer, std::string_view text) {
  const auto& c = model.config();
  auto tokens = tokenizer.encode(text);
  tokens.push_back(c.eos_token_id);
  const std::size_t window = static_cast<std::size_t>(c.max_sequence_length) - 2;
  QG_CHECK(window > 0, "max_sequence_length too small to score text");
  LogLikelihood total;
  for (std::size_t begin = 0; begin < tokens.size(); begin += window) {
    const std::size_t end = std::min(tokens.size(), begin + window);
    std::vector<int> ids = {c.gmask_token_id, c.bos_token_id};
    ids.insert(ids.end(), tokens.begin() + static_cast<std::ptrdiff_t>(begin),
               tokens.begin() + static_cast<std::ptrdiff_t>(end));
    total += log_likelihood(model, ids, 2);
  }
  return total;
}

LogLikelihood answer_log_likelihood(const model::GlmModel& model,
                                    const text::ChatGlmTokenizer& tokenizer,
                                    std::string_view prompt, std::string_view answer) {
  const auto& c = model.config();
  auto ids = tokenizer.encode(prompt);
  ids.push_back(c.gmask_token_id);
  ids.push_back(c.bos_token_id);
  const int first_target = static_cast<int>(ids.size());
  const auto answer_ids = tokenizer.encode(answer);
  ids.insert(ids.end(), answer_ids.begin(), answer_ids.end());
  ids.push_back(c.eos_token_id);
  QG_CHECK(static_cast<std::int64_t>(ids.size()) <= c.max_sequence_length, "record of ", ids.size(),
           " tokens exceeds max_sequence_length ", c.max_sequence_length);
  return log_likelihood(model, ids, first_target);
}

LogLikelihood jsonl_log_likelihood(
    const model::GlmModel& model, const text::ChatGlmTokenizer& tokenizer,
    const std::filesystem::path& file,
    const std::function<void(long long, const LogLikelihood&)>& on_record) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open file");
  LogLikelihood total;
  long long records = 0, line_no = 0;
  std::string line;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string origin = file.string() + ":" + std::to_string(line_no);
    const auto doc = json::Document::parse(line, origin);
    const auto o = json::as_object(doc.root(), origin, "each line");
    if (auto text = json::optional_string(o, "text", origin)) {
      total += text_log_likelihood(model, tokenizer, *text);
    } else if (auto question = json::optional_string(o, "question", origin)) {
      total += answer_log_likelihood(model, tokenizer, *question, json::get_string(o, "answer", origin));
    } else if (auto instruction = json::optional_string(o, "instruction", origin)) {
      const std::string input = json::optional_string(o, "input", origin).value_or("");
      const std::string prompt = input.empty() ? *instruction : *instruction + "\n" + input;
      total += answer_log_likelihood(model, tokenizer, prompt, json::get_string(o, "output", origin));
    } else {
      fail(origin, ": expected a \"text\", \"question\"/\"answer\" or "
                   "\"instruction\"/\"input\"/\"output\" record");
    }
    ++records;
    if (on_record) on_record(records, total);
  }
  return total;
}

}  // namespace qg::engine
