// GlmModel: ChatGLM-6B (v1) — weights plus the forward pass, written once against Backend.
//
// Layer i (x is the layer input, alpha = sqrt(2 * 28) for every model size, as THUDM's code):
//   a = LN(x);  h = a * alpha + Attention(a);  m = LN(h);  x' = m * alpha + MLP(m)
// then a final LayerNorm and the (possibly tied) lm_head. See docs/chatglm-format.md.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <memory>
#include <vector>

#include "qinggeng/io/model_config.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/model/backend.h"

namespace qg::model {

/// \brief The residual scale of GLM blocks: sqrt(2 * 28), independent of num_layers.
constexpr double kGlmResidualAlpha = 7.483314773547883;  // std::sqrt(56.0)

/// \brief A loaded ChatGLM v1 model on one backend.
class GlmModel {
 public:
  /// \brief Loads config.json and the weights of `model_dir` onto `backend`.
  /// \throws qg::Error naming the file/tensor for missing or mis-shaped weights.
  static GlmModel load(const std::filesystem::path& model_dir, std::shared_ptr<Backend> backend);
  /// \brief Builds the model from an already-open store and config.
  static GlmModel from_store(const io::ModelConfig& config, const io::WeightStore& store,
                             std::shared_ptr<Backend> backend);

  /// \brief Supplies the tensor `name`, checked to have `shape`, or nullptr when it is absent
  /// (only lm_head.weight may be absent). The view must stay valid until the next call.
  using WeightSource = std::function<const io::TensorView*(const std::string& name,
                                                           const std::vector<std::int64_t>& shape)>;
  /// \brief Builds the model from any weight provider (a store, generated weights, ...).
  static GlmModel from_source(const io::ModelConfig& config, const WeightSource& source,
                              std::shared_ptr<Backend> backend);

  const io::ModelConfig& config() const { return config_; }
  Backend& backend() const { return *backend_; }
  /// \brief Shared handle to the backend (for objects that must outlive a call).
  const std::shared_ptr<Backend>& backend_ptr() const { return backend_; }

  /// \brief A cache for one sequence (capacity defaults to max_sequence_length).
  std::unique_ptr<KvCache> new_kv_cache(int capacity = 0) const;

  /// \brief Runs every chunk's new tokens through the model, appending to their caches.
  ///
  /// Returns float32 logits, row-major [rows, vocab_size]: for each chunk in order, one row
  /// per new token when `all_logits`, else one row for its last token.
  /// \throws qg::Error if a token id is outside the vocabulary, a chunk is empty, its
  /// position vectors disagree in length with its tokens, or a cache would overflow.
  std::vector<float> forward(const std::vector<SequenceChunk>& batch) const;
  /// \brief forward() leaving the float32 logits [rows, vocab_size] on the backend (for
  /// sampling on the device).
  Tensor forward_logits(const std::vector<SequenceChunk>& batch) const;

  /// \brief Loads a PEFT LoRA adapter directory as runtime adapter `id`: sequences whose
  /// SequenceChunk::adapter is `id` get y += scale * (x A^T) B^T on the adapted modules, with
  /// no change to the base weights (other sequences in the same batch are unaffected).
  /// \throws qg::Error naming the file for a bad adapter or one made for another model shape.
  void load_adapter(int id, const std::filesystem::path& adapter_dir);
  /// \brief Registers an in-memory adapter as runtime adapter `id`.
  void add_adapter(int id, const lora::LoraAdapter& adapter);

  /// \brief Bytes of weights held by the backend.
  std::size_t weight_bytes() const { return weight_bytes_; }

 private:
  struct Layer {
    Tensor ln1_w, ln1_b, qkv_w, qkv_b, dense_w, dense_b;
    Tensor ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  GlmModel() = default;

  bool adapted(int layer, lora::LoraTarget target) const;

  io::ModelConfig config_;
  std::shared_ptr<Backend> backend_;
  std::vector<std::unique_ptr<lora::LoraAdapter>> adapters_;  // by id, for which modules adapt
  Tensor embeddings_;
  std::vector<Layer> layers_;
  Tensor final_ln_w_, final_ln_b_;
  Tensor lm_head_;
  std::size_t weight_bytes_ = 0;
};

}  // namespace qg::model
