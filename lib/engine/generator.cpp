// generate / score_logits / log_likelihood (see include/qinggeng/engine/generator.h).
#include "qinggeng/engine/generator.h"

#include <algorithm>
#include <cmath>

#include "qinggeng/engine/batch_generator.h"
#include "qinggeng/error.h"
#include "qinggeng/text/glm_layout.h"

namespace qg::engine {
namespace {

text::GlmLayout layout_of(const model::GlmModel& model, const std::vector<int>& ids) {
  const auto& c = model.config();
  return text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
}

}  // namespace

model::SequenceChunk layout_chunk(const text::GlmLayout& layout, model::KvCache& cache,
                                  std::vector<int> tokens, bool all_logits) {
  model::SequenceChunk chunk;
  chunk.cache = &cache;
  chunk.context_length = layout.context_length;
  chunk.all_logits = all_logits;
  const int first = cache.length();
  for (int i = 0; i < static_cast<int>(tokens.size()); ++i) {
    chunk.positions.push_back(layout.position(first + i));
    chunk.block_positions.push_back(layout.block_position(first + i));
  }
  chunk.tokens = std::move(tokens);
  return chunk;
}

GenerationResult generate(const model::GlmModel& model, const std::vector<int>& prompt,
                          const GenerationConfig& config, const TokenCallback& on_token) {
  BatchGenerator one(model, BatchOptions{1, static_cast<int>(prompt.size()) + 1});
  one.submit({prompt, config, on_token});
  return std::move(one.run().at(0).result);
}

std::vector<float> score_logits(const model::GlmModel& model, const std::vector<int>& ids) {
  QG_CHECK(!ids.empty(), "score: no token ids given");
  QG_CHECK(static_cast<std::int64_t>(ids.size()) <= model.config().max_sequence_length, "score: ",
           ids.size(), " ids exceed max_sequence_length ", model.config().max_sequence_length);
  auto cache = model.new_kv_cache(static_cast<int>(ids.size()));
  return model.forward({layout_chunk(layout_of(model, ids), *cache, ids, true)});
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
