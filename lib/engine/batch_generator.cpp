// BatchGenerator (see include/qinggeng/engine/batch_generator.h).
#include "qinggeng/engine/batch_generator.h"

#include <algorithm>

#include "qinggeng/error.h"
#include "qinggeng/text/glm_layout.h"

namespace qg::engine {

struct BatchGenerator::Sequence {
  int id = 0;
  GenerationRequest request;
  text::GlmLayout layout;
  int limit = 0;                              // total tokens (prompt + generated) at most
  std::unique_ptr<model::KvCache> cache;
  std::unique_ptr<Sampler> sampler;
  std::vector<int> history;                   // prompt + generated, for the repetition penalty
  std::vector<int> pending;                   // tokens to feed at the next step
  GenerationResult result;
  bool done = false;
};

BatchGenerator::BatchGenerator(const model::GlmModel& model, BatchOptions options)
    : model_(model), options_(options) {
  QG_CHECK(options_.max_sequences > 0, "batch: max_sequences must be positive");
  QG_CHECK(options_.max_prefill_tokens > 0, "batch: max_prefill_tokens must be positive");
}

BatchGenerator::~BatchGenerator() = default;

int BatchGenerator::submit(GenerationRequest request) {
  const auto& c = model_.config();
  const auto& prompt = request.prompt;
  QG_CHECK(!prompt.empty(), "generate: empty prompt");
  QG_CHECK(std::find(prompt.begin(), prompt.end(), c.bos_token_id) != prompt.end(),
           "generate: the prompt has no <sop> (id ", c.bos_token_id,
           "); build it as text + [gMASK] + <sop>");
  const int max_length =
      std::min<int>(request.config.max_length, static_cast<int>(c.max_sequence_length));
  const int prompt_len = static_cast<int>(prompt.size());
  QG_CHECK(prompt_len < max_length, "generate: the prompt has ", prompt_len,
           " tokens, which leaves no room under the maximum length ", max_length);
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->limit = max_length;
  if (request.config.max_new_tokens > 0) {
    seq->limit = std::min(seq->limit, prompt_len + request.config.max_new_tokens);
  }
  seq->sampler = std::make_unique<Sampler>(request.config.sampling);
  seq->layout = text::GlmLayout::from_ids(prompt, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
  seq->history = prompt;
  seq->pending = prompt;
  seq->request = std::move(request);
  waiting_.push_back(std::move(seq));
  return next_id_ - 1;
}

void BatchGenerator::finish(Sequence& seq, FinishReason reason) {
  seq.done = true;
  seq.result.reason = reason;
  seq.cache.reset();  // give the cache memory back before the next arrivals
  finished_.push_back({seq.id, std::move(seq.result)});
}

bool BatchGenerator::step() {
  // Admit waiting requests while there is room; the first always fits.
  int prefill_tokens = 0;
  while (!waiting_.empty() && static_cast<int>(active_.size()) < options_.max_sequences) {
    const int n = static_cast<int>(waiting_.front()->pending.size());
    if (prefill_tokens > 0 && prefill_tokens + n > options_.max_prefill_tokens) break;
    prefill_tokens += n;
    auto seq = std::move(waiting_.front());
    waiting_.pop_front();
    seq->cache = model_.new_kv_cache(seq->limit);
    active_.push_back(std::move(seq));
  }
  if (active_.empty()) return false;

  std::vector<model::SequenceChunk> batch;
  batch.reserve(active_.size());
  for (const auto& seq : active_) {
    batch.push_back(layout_chunk(seq->layout, *seq->cache, seq->pending, false));
    batch.back().adapter = seq->request.config.adapter;
  }
  const std::vector<int> next_tokens = pick_tokens(batch);
  const int eos = model_.config().eos_token_id;

  for (std::size_t i = 0; i < active_.size(); ++i) {
    Sequence& seq = *active_[i];
    const int next = next_tokens[i];
    if (next == eos) {
      finish(seq, FinishReason::Eos);
      continue;
    }
    seq.result.tokens.push_back(next);
    seq.history.push_back(next);
    seq.pending = {next};
    if (seq.request.on_token && !seq.request.on_token(next)) {
      finish(seq, FinishReason::Stopped);
    } else if (static_cast<int>(seq.history.size()) >= seq.limit) {
      finish(seq, FinishReason::Length);
    }
  }
  active_.erase(std::remove_if(active_.begin(), active_.end(), [](const auto& s) { return s->done; }),
                active_.end());
  return true;
}

std::vector<int> BatchGenerator::pick_tokens(const std::vector<model::SequenceChunk>& batch) {
  model::Backend& backend = model_.backend();
  if (backend.samples_on_device()) {
    // Only the ids leave the device; each sequence's random stream is positioned by how many
    // tokens it has generated, so a sequence draws the same tokens in any batch.
    std::vector<SamplingConfig> configs;
    std::vector<const std::vector<int>*> histories;
    std::vector<std::uint64_t> steps;
    static const std::vector<int> kNoHistory;
    for (const auto& seq : active_) {
      const auto& sampling = seq->request.config.sampling;
      configs.push_back(sampling);
      histories.push_back(sampling.repetition_penalty != 1.0f ? &seq->history : &kNoHistory);
      steps.push_back(seq->result.tokens.size());
    }
    return backend.sample_tokens(model_.forward_logits(batch), configs, histories, steps);
  }
  const auto logits = model_.forward(batch);
  const std::size_t V = static_cast<std::size_t>(model_.config().vocab_size);
  std::vector<int> picked;
  for (std::size_t i = 0; i < active_.size(); ++i) {
    std::vector<float> row(logits.begin() + static_cast<std::ptrdiff_t>(i * V),
                           logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * V));
    picked.push_back(active_[i]->sampler->sample(row, active_[i]->history));
  }
  return picked;
}

std::vector<FinishedRequest> BatchGenerator::take_finished() {
  std::vector<FinishedRequest> out;
  out.swap(finished_);
  return out;
}

std::vector<FinishedRequest> BatchGenerator::run() {
  std::vector<FinishedRequest> all = take_finished();
  while (step()) {
    for (auto& f : take_finished()) all.push_back(std::move(f));
  }
  for (auto& f : take_finished()) all.push_back(std::move(f));
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return all;
}

std::vector<GenerationResult> generate_batch(const model::GlmModel& model,
                                             const std::vector<std::vector<int>>& prompts,
                                             const GenerationConfig& config, BatchOptions options) {
  BatchGenerator batch(model, options);
  for (const auto& p : prompts) batch.submit({p, config, {}});
  std::vector<GenerationResult> results;
  for (auto& f : batch.run()) results.push_back(std::move(f.result));
  return results;
}

}  // namespace qg::engine
