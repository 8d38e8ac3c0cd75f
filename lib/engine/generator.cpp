// generate / score_logits / log_likelihood (see include/qinggeng/engine/generator.h).
#include "qinggeng/engine/generator.h"

#include <algorithm>
#include <cmath>

#include "qinggeng/error.h"
#include "qinggeng/text/glm_layout.h"

namespace qg::engine {
namespace {

text::GlmLayout layout_of(const model::GlmModel& model, const std::vector<int>& ids) {
  const auto& c = model.config();
  return text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
}

model::SequenceChunk chunk_for(const text::GlmLayout& layout, model::KvCache& cache,
                               const std::vector<int>& tokens, int first_index, bool all_logits) {
  model::SequenceChunk chunk;
  chunk.cache = &cache;
  chunk.tokens = tokens;
  chunk.context_length = layout.context_length;
  chunk.all_logits = all_logits;
  for (int i = 0; i < static_cast<int>(tokens.size()); ++i) {
    chunk.positions.push_back(layout.position(first_index + i));
    chunk.block_positions.push_back(layout.block_position(first_index + i));
  }
  return chunk;
}

}  // namespace

GenerationResult generate(const model::GlmModel& model, const std::vector<int>& prompt,
                          const GenerationConfig& config, const TokenCallback& on_token) {
  const auto& c = model.config();
  QG_CHECK(!prompt.empty(), "generate: empty prompt");
  QG_CHECK(std::find(prompt.begin(), prompt.end(), c.bos_token_id) != prompt.end(),
           "generate: the prompt has no <sop> (id ", c.bos_token_id,
           "); build it as text + [gMASK] + <sop>");
  const int max_length = std::min<int>(config.max_length, static_cast<int>(c.max_sequence_length));
  const int prompt_len = static_cast<int>(prompt.size());
  QG_CHECK(prompt_len < max_length, "generate: the prompt has ", prompt_len,
           " tokens, which leaves no room under the maximum length ", max_length);
  int limit = max_length;
  if (config.max_new_tokens > 0) limit = std::min(limit, prompt_len + config.max_new_tokens);

  Sampler sampler(config.sampling);
  const auto layout = layout_of(model, prompt);
  auto cache = model.new_kv_cache(limit);
  std::vector<int> history = prompt;
  GenerationResult result;
  std::vector<float> logits = model.forward({chunk_for(layout, *cache, prompt, 0, false)});
  for (;;) {
    const int next = sampler.sample(logits, history);
    if (next == c.eos_token_id) {
      result.reason = FinishReason::Eos;
      break;
    }
    result.tokens.push_back(next);
    history.push_back(next);
    if (on_token && !on_token(next)) {
      result.reason = FinishReason::Stopped;
      break;
    }
    if (static_cast<int>(history.size()) >= limit) {
      result.reason = FinishReason::Length;
      break;
    }
    logits = model.forward({chunk_for(layout, *cache, {next},
                                      static_cast<int>(history.size()) - 1, false)});
  }
  return result;
}

std::vector<float> score_logits(const model::GlmModel& model, const std::vector<int>& ids) {
  QG_CHECK(!ids.empty(), "score: no token ids given");
  QG_CHECK(static_cast<std::int64_t>(ids.size()) <= model.config().max_sequence_length, "score: ",
           ids.size(), " ids exceed max_sequence_length ", model.config().max_sequence_length);
  auto cache = model.new_kv_cache(static_cast<int>(ids.size()));
  return model.forward({chunk_for(layout_of(model, ids), *cache, ids, 0, true)});
}

double LogLikelihood::perplexity() const {
  return tokens == 0 ? 1.0 : std::exp(-total_logprob / static_cast<double>(tokens));
}

LogLikelihood& LogLikelihood::operator+=(const LogLikelihood& other) {
  total_logprob += other.total_logprob;
  tokens += other.tokens;
  return *this;
}

LogLikelihood log_likelihood(const model::GlmModel& model, const std::vector<int>& ids,
                             int first_target) {
  QG_CHECK(first_target >= 1 && first_target <= static_cast<int>(ids.size()),
           "log_likelihood: first target ", first_target, " outside [1, ", ids.size(), "]");
  const auto logits = score_logits(model, ids);
  const std::size_t V = static_cast<std::size_t>(model.config().vocab_size);
  LogLikelihood ll;
  for (std::size_t t = static_cast<std::size_t>(first_target); t < ids.size(); ++t) {
    const float* row = logits.data() + (t - 1) * V;
    const float mx = *std::max_element(row, row + V);
    double sum = 0;
    for (std::size_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v] - mx));
    ll.total_logprob += static_cast<double>(row[ids[t]] - mx) - std::log(sum);
    ++ll.tokens;
  }
  return ll;
}

}  // namespace qg::engine
