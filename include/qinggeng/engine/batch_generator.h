// BatchGenerator: continuous batching over one GlmModel. Requests (prompts of any length,
// each with its own limits, sampling settings and streaming callback) wait in a queue; every
// step() admits waiting requests while the batch has room, runs ONE forward over the whole
// batch (the prompts of newly admitted requests plus one token for every decoding sequence),
// samples each sequence's next token, and retires finished sequences, freeing their caches
// for the next arrivals. Each sequence samples with its own seeded random stream, so its
// tokens are the same as generating it alone. Backends that sample on the device (CUDA) keep
// the logits there and return only token ids.
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <vector>

#include "qinggeng/engine/generator.h"

namespace qg::engine {

/// \brief One generation job.
struct GenerationRequest {
  std::vector<int> prompt;   ///< token ids containing <sop> (text + [gMASK] + <sop>)
  GenerationConfig config;   ///< limits and sampling of this request
  TokenCallback on_token;    ///< optional streaming callback; return false to stop it
};

/// \brief A finished request.
struct FinishedRequest {
  int id = 0;                ///< what submit() returned
  GenerationResult result;
};

/// \brief Batch limits.
struct BatchOptions {
  int max_sequences = 16;        ///< sequences decoding together, at most
  int max_prefill_tokens = 4096; ///< prompt tokens admitted per step (one prompt always fits)
};

/// \brief Continuous-batching generation scheduler.
class BatchGenerator {
 public:
  BatchGenerator(const model::GlmModel& model, BatchOptions options = {});
  ~BatchGenerator();

  /// \brief Queues a request; it joins the batch at a later step().
  /// \throws qg::Error when the prompt lacks <sop>, is empty, or leaves no room to generate.
  int submit(GenerationRequest request);
  /// \brief One forward over the current batch. Returns false when nothing is active or waiting.
  bool step();
  /// \brief Requests finished since the last call, in finishing order.
  std::vector<FinishedRequest> take_finished();
  /// \brief Runs step() until every request is done; returns them all ordered by id.
  std::vector<FinishedRequest> run();

  std::size_t active() const { return active_.size(); }
  std::size_t waiting() const { return waiting_.size(); }

 private:
  struct Sequence;
  void finish(Sequence& seq, FinishReason reason);
  /// The next token of every active sequence: sampled on the device when the backend can,
  /// else from host logits with each sequence's Sampler.
  std::vector<int> pick_tokens(const std::vector<model::SequenceChunk>& batch);

  const model::GlmModel& model_;
  BatchOptions options_;
  int next_id_ = 0;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> active_;
  std::vector<FinishedRequest> finished_;
};

/// \brief Generates every prompt with the same settings, batched; results in prompt order.
std::vector<GenerationResult> generate_batch(const model::GlmModel& model,
                                             const std::vector<std::vector<int>>& prompts,
                                             const GenerationConfig& config,
                                             BatchOptions options = {});

}  // namespace qg::engine
