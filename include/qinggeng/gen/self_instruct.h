// Self-instruct generation of Chinese medical tasks: sample seed and generated examples, ask
// the model for a numbered list of new 指令/输入/输出 tasks of one category, parse every block,
// filter (length, blacklist, Chinese, ROUGE-L novelty against the whole pool) and append the
// survivors to a JSONL file that a rerun resumes from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/gen/cancellation.h"
#include "qinggeng/gen/chat_client.h"
#include "qinggeng/gen/progress.h"
#include "qinggeng/gen/prompt_template.h"

namespace qg::gen {

/// \brief One task: the fields qg-train reads (`instruction`, `input`, `output`) + category.
struct SeedTask {
  std::string category;
  std::string instruction;
  std::string input;  ///< may be empty
  std::string output;
};

/// \brief Reads seed tasks from JSONL, one object per line with string fields `category`,
/// `instruction`, `input` (may be empty) and `output`. Throws qg::Error naming file, line and
/// field for a bad line, or the file when it holds no task.
std::vector<SeedTask> load_seed_tasks(const std::filesystem::path& file);

/// \brief Parses every numbered task block (指令/输入/输出, optional 类别) in a model reply.
///
/// Tolerates markdown, ASCII or full-width colons, "###" separators, missing inputs ("<无输入>",
/// "无" become ""), multi-line outputs. When `truncated` (finish_reason "length") the last block
/// is dropped because it may be cut off. Fields are whitespace-normalised; blocks without an
/// instruction or output are skipped.
std::vector<SeedTask> parse_task_blocks(std::string_view reply, bool truncated);

/// \brief Acceptance rules for generated tasks (lengths in characters).
struct TaskFilter {
  std::size_t min_instruction_chars = 6;
  std::size_t max_instruction_chars = 300;
  std::size_t max_input_chars = 800;
  std::size_t min_output_chars = 6;
  std::size_t max_output_chars = 2000;
  /// Case-insensitive substrings that reject a task anywhere in its text.
  std::vector<std::string> blacklist = {"图片", "图像", "照片", "视频", "音频", "链接", "网址",
                                        "http", "www.", "作为一个AI", "作为AI", "作为一名AI",
                                        "作为人工智能", "AI语言模型", "as an ai",
                                        "language model", "我无法"};
};

/// \brief Why `task` fails `filter` ("" when it passes): a short reason for statistics.
std::string check_task(const SeedTask& task, const TaskFilter& filter);

/// \brief Settings of a self-instruct run.
struct SelfInstructOptions {
  std::filesystem::path output;        ///< JSONL, appended to and resumed from
  std::size_t target = 100;            ///< stop when the output holds this many tasks
  int workers = 4;                     ///< concurrent requests
  int examples_per_prompt = 6;         ///< k examples shown per request
  double machine_ratio = 0.25;         ///< share of examples drawn from generated tasks
  int tasks_per_request = 8;           ///< new tasks asked for per request
  double similarity_threshold = 0.7;   ///< reject when ROUGE-L >= this against the pool
  /// The closest pool item is searched exactly down to this score (the record's
  /// "most_similar"); below it the search is pruned and the field may be empty. Lower is
  /// slower on large pools.
  double similarity_report_floor = 0.5;
  TaskFilter filter;
  TemplateSource prompt;               ///< empty text: default_self_instruct_template()
  std::vector<std::string> categories;  ///< empty: the categories of the seed tasks
  std::uint64_t random_seed = 1;
  int max_consecutive_errors = 10;     ///< stop the run after this many failed requests in a row
};

/// \brief Runs self-instruct generation against a ChatClient.
///
/// Output records: {"instruction","input","output","category","most_similar","similarity",
/// "request_id","model"}; "most_similar" is the closest pool text (seed or generated) and
/// "similarity" its ROUGE-L (exact when at least `similarity_report_floor`). On start the output's torn tail is repaired and its records are
/// loaded into the pool and the count, so a rerun continues where the last one stopped.
class SelfInstructGenerator {
 public:
  SelfInstructGenerator(ChatClient& client, std::vector<SeedTask> seeds,
                        SelfInstructOptions options);
  ~SelfInstructGenerator();

  /// \brief Generates until the output holds `target` tasks, cancellation, or a fatal API
  /// error (rethrown after the workers stop; finished records stay written). Returns the
  /// number of tasks in the output.
  std::size_t run(Cancellation& cancel);

  /// \brief The prompt for `category` with `examples` (exposed for tests).
  std::string build_prompt(const std::vector<SeedTask>& examples,
                           const std::string& category) const;

  const GenStats& stats() const { return stats_; }

 private:
  struct State;
  ChatClient& client_;
  SelfInstructOptions options_;
  GenStats stats_;
  std::unique_ptr<State> state_;
};

}  // namespace qg::gen
