// Sampler: turns one row of logits into the next token id, the way HF's generate() does for
// ChatGLM: repetition penalty, then temperature, top-k and top-p (nucleus) filtering, then a
// draw from the softmax — or argmax when sampling is off. Seeded, so runs are reproducible.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace qg::engine {

/// \brief Decoding settings (defaults are the ChatGLM-6B reference chat's).
struct SamplingConfig {
  bool do_sample = true;            ///< false: greedy (argmax after the repetition penalty)
  float temperature = 0.95f;        ///< > 0; logits are divided by it
  float top_p = 0.7f;               ///< keep the smallest set of tokens with mass >= top_p; 1 = off
  int top_k = 0;                    ///< keep the k most likely tokens; 0 = off
  float repetition_penalty = 1.0f;  ///< > 0; CTRL-style penalty on tokens already present; 1 = off
  std::uint64_t seed = 0;           ///< random seed for sampling

  /// \brief Throws qg::Error naming the field when a value is out of range.
  void validate() const;
};

/// \brief Stateful token picker (holds the random generator).
class Sampler {
 public:
  explicit Sampler(const SamplingConfig& config);

  /// \brief Picks the next token from `logits` (vocab entries; modified in place).
  /// `history` holds every token id of the sequence so far (for the repetition penalty).
  /// Non-finite logits are treated as in ChatGLM's InvalidScoreLogitsProcessor.
  int sample(std::vector<float>& logits, const std::vector<int>& history);

  const SamplingConfig& config() const { return config_; }

 private:
  SamplingConfig config_;
  std::mt19937_64 rng_;
};

/// \brief The index of the largest value (first on ties).
int argmax(const float* values, std::size_t n);

}  // namespace qg::engine
