// Training data for instruction tuning: reading question/answer records, laying them out as
// GLM training sequences (spec section 2), planning length-bucketed batches that a resumed run
// replays exactly, and a stable held-out split. docs/training-data.md explains the choices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace qg::io {
struct ModelConfig;
}
namespace qg::text {
class ChatGlmTokenizer;
}

namespace qg::train {

// ---------------------------------------------------------------------------------------------
// Records

/// \brief Which record shape a training example was read from (detected per record).
enum class RecordShape {
  kQuestionAnswer,  ///< {question, answer} (MedicalGPT-zh)
  kBookQa,          ///< qg-gen-bookqa: {passage_id, passage, question, answer, model}
  kInstruction,     ///< {instruction, input, output} (Alpaca style)
  kDialogue,        ///< qg-gen-dialogue: {instruction, input, output, category, ...}
};

/// \brief Name of a shape for logs ("question_answer", "book_qa", "instruction", "dialogue").
const char* shape_name(RecordShape shape);

/// \brief One prompt/answer pair before tokenization.
struct TextExample {
  std::string prompt;  ///< question, or instruction + "\n" + input (input when non-empty)
  std::string answer;  ///< answer or output
  RecordShape shape = RecordShape::kQuestionAnswer;
  std::string origin;  ///< "file:line" of the record, for messages
};

/// \brief Parses records from `text`: a JSON array of objects (first non-space byte '[') or
/// JSON Lines (one object per line, blank lines skipped). `origin` (a file name) prefixes
/// every message as "origin:line".
///
/// A record with an `instruction` key is an instruction record (`output` required, `input`
/// optional, may be null or empty); otherwise `question` and `answer` are required. A book QA
/// record's passage is not put in the prompt: the model learns to answer without it. Other keys
/// are ignored.
/// \throws qg::Error naming "origin:line" and the field for invalid JSON, a record that is not
/// an object, a missing field, a non-string field, an empty prompt or answer, or a record
/// holding both `question` and `instruction`.
std::vector<TextExample> parse_text_examples(std::string_view text, const std::string& origin);

/// \brief Reads a .json or .jsonl file with parse_text_examples.
/// \throws qg::Error naming the file when it cannot be read or holds no record.
std::vector<TextExample> load_text_examples(const std::filesystem::path& file);

// ---------------------------------------------------------------------------------------------
// GLM layout

/// \brief Label value the loss ignores (PyTorch's default ignore_index).
inline constexpr int kIgnoreLabel = -100;

/// \brief Which part of an over-long prompt survives.
enum class PromptTruncation {
  kKeepStart,  ///< drop the prompt's last tokens (as the HF ChatGLM fine-tuning script does)
  kKeepEnd,    ///< drop the prompt's first tokens (keeps the text nearest the answer)
};

/// \brief How an example becomes a sequence.
struct LayoutOptions {
  int max_length = 512;   ///< whole sequence, special tokens included (>= 3)
  bool use_gmask = true;  ///< [gMASK] (ChatGLM chat models) or [MASK] before <sop>
  /// Prompt tokens kept (when the prompt has them) before the answer's tail is cut: without a
  /// floor a long answer would erase its question. Clamped to max_length - 3.
  int min_prompt_tokens = 64;
  PromptTruncation prompt_truncation = PromptTruncation::kKeepStart;
};

/// \brief One training sequence: `prompt + [gMASK] + <sop> + answer + <eop>`.
///
/// `labels` is aligned with `input_ids` (the HF convention): kIgnoreLabel up to and including
/// <sop>, the token itself after it. The logits at position t are scored against labels[t + 1]
/// (next_token_targets() does the shift). When the answer had to be cut the <eop> is left out,
/// so the model never learns to stop at an artificial cut.
struct TrainingExample {
  std::vector<int> input_ids;
  std::vector<int> labels;
  int context_length = 0;               ///< index of <sop>
  int mask_position = 0;                ///< index of [gMASK] / [MASK] (context_length - 1)
  std::vector<int> position_ids;        ///< t before <sop>, mask_position from <sop> on
  std::vector<int> block_position_ids;  ///< 0 before <sop>, t - context_length + 1 from it
  int prompt_tokens_dropped = 0;
  int answer_tokens_dropped = 0;

  /// \brief Sequence length.
  int size() const { return static_cast<int>(input_ids.size()); }
  /// \brief The target of the logits at each position: labels shifted left by one, with
  /// kIgnoreLabel at the end.
  std::vector<int> next_token_targets() const;
  /// \brief Positions whose logits are scored (answer tokens plus <eop> when kept).
  int scored_tokens() const;
};

/// \brief Lays out tokenized prompt and answer with the special ids of `config`.
///
/// Truncation when the sequence exceeds max_length: first the prompt shrinks (down to
/// min_prompt_tokens, on the side LayoutOptions::prompt_truncation says); then the answer
/// loses its tail and its <eop>. The answer's first token is always kept.
/// \throws qg::Error when max_length < 3.
TrainingExample layout_example(const std::vector<int>& prompt_ids,
                               const std::vector<int>& answer_ids, const io::ModelConfig& config,
                               const LayoutOptions& options);

/// \brief Tokenizes (prompt and answer separately, as the HF scripts do) and lays out.
TrainingExample make_training_example(const TextExample& example,
                                      const text::ChatGlmTokenizer& tokenizer,
                                      const io::ModelConfig& config, const LayoutOptions& options);

// ---------------------------------------------------------------------------------------------
// Batches

/// \brief How examples are grouped into batches.
struct BatchPlanOptions {
  /// Most padded tokens in a batch (rows x longest row); 0 = no token budget. An example
  /// longer than the budget forms a batch of its own.
  std::size_t max_tokens = 0;
  std::size_t batch_size = 4;  ///< most rows in a batch; 0 = only the token budget limits
  /// Examples per mega-bucket: each epoch is shuffled, cut into buckets of this many examples,
  /// and each bucket is sorted by length before batching, so batches hold similar lengths yet
  /// the data order stays random at a coarser grain. 1 = no bucketing (plain shuffled batches).
  std::size_t bucket_examples = 1024;
  std::uint64_t seed = 1;
};

/// \brief Where a run is in its data: the next batch to train on. Serialised in checkpoints.
struct DataPosition {
  std::uint64_t epoch = 0;
  std::uint64_t batch = 0;        ///< index of the next batch within the epoch
  std::uint64_t fingerprint = 0;  ///< of the plan (lengths + options) it belongs to

  /// \brief `{"epoch":E,"batch":B,"fingerprint":"<16 hex>"}`.
  std::string to_json() const;
  /// \brief Parses to_json() output.
  /// \throws qg::Error naming `origin` and the field.
  static DataPosition from_json(std::string_view json, const std::string& origin);
  bool operator==(const DataPosition& o) const {
    return epoch == o.epoch && batch == o.batch && fingerprint == o.fingerprint;
  }
};

/// \brief Real versus padded tokens of a set of batches.
struct PaddingStats {
  std::size_t batches = 0;
  std::size_t examples = 0;
  std::size_t real_tokens = 0;
  std::size_t padded_tokens = 0;  ///< sum over batches of rows x longest row
  /// \brief real / padded (1 = no padding).
  double efficiency() const {
    return padded_tokens ? static_cast<double>(real_tokens) / static_cast<double>(padded_tokens)
                         : 1.0;
  }
};

/// \brief Padding of `batches` (lists of indices into `lengths`).
PaddingStats padding_stats(const std::vector<std::vector<std::size_t>>& batches,
                           const std::vector<int>& lengths);

/// \brief Deterministic, resumable length-bucketed batches. Every example appears exactly once
/// per epoch; epoch e's batches depend only on the lengths, the options and e, and are the same
/// on every platform (the shuffles use their own generator, not std::shuffle).
class BatchPlanner {
 public:
  /// \throws qg::Error for no examples, a length < 1, or batch_size and max_tokens both 0.
  BatchPlanner(std::vector<int> lengths, const BatchPlanOptions& options);

  /// \brief The batches of epoch `epoch`, in training order.
  std::vector<std::vector<std::size_t>> epoch_batches(std::uint64_t epoch) const;

  /// \brief Position of the first batch of epoch 0.
  DataPosition start() const { return {0, 0, fingerprint_}; }
  /// \brief The batch at `position`, then moves `position` to the next one (into the next
  /// epoch after the last batch). Caches the current epoch's plan.
  /// \throws qg::Error when `position` belongs to another plan (different data or options) or
  /// its batch index is past the end of its epoch.
  std::vector<std::size_t> next(DataPosition& position);

  /// \brief Hash of the lengths and options, stored in every DataPosition.
  std::uint64_t fingerprint() const { return fingerprint_; }
  std::size_t size() const { return lengths_.size(); }
  const std::vector<int>& lengths() const { return lengths_; }

 private:
  std::vector<int> lengths_;
  BatchPlanOptions options_;
  std::uint64_t fingerprint_ = 0;
  std::uint64_t cached_epoch_ = UINT64_MAX;
  std::vector<std::vector<std::size_t>> cached_;
};

// ---------------------------------------------------------------------------------------------
// Held-out split

/// \brief How many examples to hold out for evaluation: `count` when non-zero (plus the
/// duplicates of the last one taken), else about a `fraction` of them.
struct SplitOptions {
  double fraction = 0.0;
  std::size_t count = 0;
  std::uint64_t seed = 1;
};

/// \brief Indices of the training and held-out examples (each in file order).
struct DataSplit {
  std::vector<std::size_t> train;
  std::vector<std::size_t> held_out;
};

/// \brief Splits by a seeded hash of each example's text, not its index: the same examples
/// stay held out when records are added, removed or reordered (with `fraction`; with `count`
/// a new example may take the place of an old one), and duplicate records land on the same
/// side, so no evaluation example is also trained on.
/// \throws qg::Error when fraction is outside [0, 1) or count >= the number of examples.
DataSplit split_examples(const std::vector<TextExample>& examples, const SplitOptions& options);

}  // namespace qg::train
