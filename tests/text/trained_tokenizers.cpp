// Test-time training of the stand-in ChatGLM tokenizers (see trained_tokenizers.h).
#include "text/trained_tokenizers.h"

#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "qinggeng/error.h"

namespace qg::test {
namespace fs = std::filesystem;

namespace {

using Args = std::map<std::string, std::string>;

std::vector<fs::path> corpus_files() {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(fs::path(QG_SOURCE_DIR) / "data" / "text")) {
    if (entry.path().extension() == ".txt") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  QG_CHECK(!files.empty(), "no corpus files in data/text");
  return files;
}

// Arguments shared by both stand-ins: a small unigram model that keeps text as written
// (identity normalization, spaces kept) so round trips are exact.
Args base_args() {
  std::string input;
  for (const auto& file : corpus_files()) input += (input.empty() ? "" : ",") + file.string();
  return {{"input", input},
          {"model_type", "unigram"},
          {"vocab_size", "1200"},
          {"hard_vocab_limit", "false"},
          {"character_coverage", "0.98"},
          {"normalization_rule_name", "identity"},
          {"remove_extra_whitespaces", "false"},
          {"num_threads", "1"},
          {"minloglevel", "2"}};
}

std::string glm_user_defined_symbols() {
  std::string symbols = "<n>,<|tab|>";
  for (int k = 2; k <= 80; ++k) symbols += ",<|blank_" + std::to_string(k) + "|>";
  return symbols;
}

std::string cache_key(const Args& args, const std::string& config_json) {
  std::ostringstream all;
  for (const auto& [key, value] : args) all << key << '=' << value << '\n';
  all << config_json;
  for (const auto& file : corpus_files()) all << std::ifstream(file, std::ios::binary).rdbuf();
  return std::to_string(std::hash<std::string>{}(all.str()));
}

// Trains into a private directory and renames it into place, so concurrent test processes
// (ctest -j) never see a half-written model; the loser of a race discards its copy.
fs::path trained_dir(const std::string& name, Args args, const std::string& config_json) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  const fs::path root = fs::path(QG_BINARY_DIR) / "test_tokenizers";
  const fs::path dir = root / (name + "-" + cache_key(args, config_json));
  if (fs::exists(dir / "ice_text.model")) return dir;

  const fs::path scratch = root / (name + ".tmp" + std::to_string(::getpid()));
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  args["model_prefix"] = (scratch / "ice_text").string();
  const std::unordered_map<std::string, std::string> kwargs(args.begin(), args.end());
  const auto status = sentencepiece::SentencePieceTrainer::Train(kwargs);
  QG_CHECK(status.ok(), "training test tokenizer ", name, ": ", status.ToString());
  fs::remove(scratch / "ice_text.vocab");
  if (!config_json.empty()) std::ofstream(scratch / "tokenizer_config.json") << config_json;

  std::error_code ec;
  fs::rename(scratch, dir, ec);
  if (ec) fs::remove_all(scratch);
  QG_CHECK(fs::exists(dir / "ice_text.model"), "test tokenizer ", name, " missing in ", dir);
  return dir;
}

}  // namespace

fs::path first_release_tokenizer_dir() { return trained_dir("first_release", base_args(), ""); }

fs::path updated_tokenizer_dir() {
  Args args = base_args();
  std::string controls;
  for (const char* piece : kSpecialPieces) {
    controls += (controls.empty() ? "" : ",") + std::string(piece);
  }
  args["control_symbols"] = controls;
  args["user_defined_symbols"] = glm_user_defined_symbols();
  args["byte_fallback"] = "true";
  args["vocab_size"] = "1500";
  return trained_dir("updated", args, "{\"num_image_tokens\": 0}\n");
}

}  // namespace qg::test
