// Generation and scoring over a GlmModel: prefill the prompt in one forward call (the GLM
// context is bidirectional, so it must be seen whole), then decode one token at a time from
// the KV cache, streaming each token to a callback. Scoring runs one full forward and returns
// the logits of every position.
#pragma once

#include <functional>
#include <vector>

#include "qinggeng/engine/sampler.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/glm_layout.h"

namespace qg::engine {

/// \brief Limits and decoding settings of one generate() call.
struct GenerationConfig {
  int max_length = 2048;     ///< prompt + generated tokens, at most (also capped by the model)
  int max_new_tokens = 0;    ///< generated tokens at most; 0 = only max_length applies
  SamplingConfig sampling;   ///< greedy or sampled decoding
  int adapter = -1;          ///< runtime LoRA adapter id (GlmModel::load_adapter), -1 none
};

/// \brief Why generation stopped.
enum class FinishReason { Eos, Length, Stopped };

/// \brief Generated tokens (the eos token, if reached, is not included).
struct GenerationResult {
  std::vector<int> tokens;
  FinishReason reason = FinishReason::Length;
};

/// \brief Called with each new token id as soon as it is chosen; return false to stop.
using TokenCallback = std::function<bool(int token)>;

/// \brief The forward-pass chunk feeding `tokens` to a sequence with `layout` whose cache
/// already holds cache.length() tokens (positions continue from there).
model::SequenceChunk layout_chunk(const text::GlmLayout& layout, model::KvCache& cache,
                                  std::vector<int> tokens, bool all_logits);

/// \brief Generates a continuation of `prompt` (which must contain the model's <sop>,
/// usually as its last token: `text + [gMASK] + <sop>`).
/// \throws qg::Error when the prompt lacks <sop>, is empty, or leaves no room under max_length.
GenerationResult generate(const model::GlmModel& model, const std::vector<int>& prompt,
                          const GenerationConfig& config, const TokenCallback& on_token = {});

/// \brief Float32 logits [ids.size(), vocab] of every position of `ids`, with the GLM layout
/// derived from the config's <sop>, [gMASK] and [MASK] ids (see text::GlmLayout::from_ids).
std::vector<float> score_logits(const model::GlmModel& model, const std::vector<int>& ids);

/// \brief Summed log-probability of the targets ids[first_target..] given what precedes them.
struct LogLikelihood {
  double total_logprob = 0;  ///< sum of natural-log probabilities
  long long tokens = 0;      ///< number of predicted tokens
  /// \brief exp(-mean log-probability); 1 for no tokens.
  double perplexity() const;
  LogLikelihood& operator+=(const LogLikelihood& other);
};

/// \brief Log-likelihood of ids[first_target], ids[first_target + 1], ... each predicted from
/// the logits of the position before it (first_target >= 1).
LogLikelihood log_likelihood(const model::GlmModel& model, const std::vector<int>& ids,
                             int first_target);

}  // namespace qg::engine
