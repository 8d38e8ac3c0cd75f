// ModelGrad: the CPU reference loss and gradient of a whole ChatGLM (v1) model on one labelled
// sequence, built from the ops of reference_backward.h. Trainable are either the LoRA factors
// of an adapter (the base weights frozen) or every weight (full-parameter training of small
// models). Float32 throughout with double reductions: the oracle the CUDA training step is
// checked against, and the engine of CPU training of tiny models.
//
// The forward is the inference forward (model/glm_model.h) plus LoRA dropout in training:
//   a = LN1(x); qkv = a Wqkv^T + b + lora(a); attention (2-D rotary, GLM mask);
//   h = a * alpha + attn Wd^T + b + lora(attn); m = LN2(h);
//   x' = m * alpha + gelu(m W1^T + b1 + lora(m)) W2^T + b2 + lora(gelu(...))
// then the final LayerNorm and a fused cross-entropy against the next-token labels.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "qinggeng/io/model_config.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/train/dataset.h"
#include "qinggeng/train/reference_backward.h"

namespace qg::train {

/// \brief Settings of one ModelGrad evaluation.
struct GradOptions {
  /// Keep only each layer's input in the forward and recompute the layer in the backward
  /// (activation checkpointing): less memory, identical numbers.
  bool checkpoint_layers = false;
  /// Apply the adapter's lora_dropout (training); false evaluates without dropout.
  bool lora_dropout = true;
  /// Selects the dropout masks; every (layer, target) draws its own stream from it.
  std::uint64_t dropout_seed = 0;
  /// Blocking of the vocabulary cross-entropy; its normalizer also scales the gradients.
  CrossEntropyOptions cross_entropy;
};

/// \brief Loss and gradients of one sequence.
struct LossAndGrad {
  double loss = 0;          ///< mean NLL over labelled tokens (or sum / normalizer)
  std::int64_t tokens = 0;  ///< labelled tokens
  /// Gradient of every trainable parameter, by name (see ModelGrad::trainable()).
  std::map<std::string, std::vector<float>> grads;
};

/// \brief Name of a LoRA factor as PEFT stores it:
/// "base_model.model.transformer.layers.{layer}.<module>.lora_A.weight" (which = 'A' or 'B').
std::string lora_parameter_name(int layer, lora::LoraTarget target, char which);

/// \brief Checks that `example` fits a model of `config` (every engine calls this first).
/// \throws qg::Error naming the field for ids or labels outside the vocabulary, lengths that
/// differ, a layout outside the sequence, or more than max_sequence_length tokens.
void check_training_example(const TrainingExample& example, const io::ModelConfig& config);

/// \brief Reference loss and gradients of a ChatGLM model, in host float32.
class ModelGrad {
 public:
  /// \brief Full-parameter training: every weight of `store` (converted to float32) is
  /// trainable, under its checkpoint name. A tied lm_head (no lm_head.weight) gets its
  /// gradient added to transformer.word_embeddings.weight.
  /// \throws qg::Error naming the tensor for a missing or mis-shaped weight.
  static ModelGrad full_parameter(const io::ModelConfig& config, const io::WeightStore& store);

  /// \brief LoRA training: base weights frozen; trainable are the A and B factors of every
  /// (layer, target) `adapter` has, starting from its values, with its scale and lora_dropout.
  /// \throws qg::Error for a missing weight or an adapter made for another model shape.
  static ModelGrad lora(const io::ModelConfig& config, const io::WeightStore& store,
                        const lora::LoraAdapter& adapter);

  /// \brief Loss and gradient of every trainable parameter on `example` (dataset.h's GLM
  /// layout; its input_ids, labels, context_length and mask_position are used, the 2-D
  /// positions derived from them).
  /// \throws qg::Error naming the field for an example that does not fit the model (ids or
  /// labels outside the vocabulary, lengths that differ, a layout outside the sequence, more
  /// than max_sequence_length tokens).
  LossAndGrad loss_and_grad(const TrainingExample& example, const GradOptions& options = {}) const;

  /// \brief The loss alone (forward only), as loss_and_grad computes it.
  double loss(const TrainingExample& example, const GradOptions& options = {}) const;

  /// \brief Names of the trainable parameters, in model order.
  const std::vector<std::string>& trainable() const { return trainable_; }

  /// \brief A parameter's values by name (trainable or frozen), for optimizer steps and
  /// finite-difference probes. \throws qg::Error for an unknown name.
  std::vector<float>& parameter(const std::string& name);
  const std::vector<float>& parameter(const std::string& name) const;

  /// \brief LoRA mode: an adapter holding the current factors (for saving or inference).
  /// \throws qg::Error in full-parameter mode.
  lora::LoraAdapter adapter() const;

  const io::ModelConfig& config() const { return config_; }

 private:
  struct LayerState;
  struct Trainables;
  ModelGrad() = default;

  LossAndGrad run(const TrainingExample& example, const GradOptions& options, bool backward) const;
  void layer_forward(int layer, const float* x, const TrainingExample& example,
                     const GradOptions& options, LayerState& s) const;
  void layer_backward(int layer, const LayerState& s, const TrainingExample& example,
                      const GradOptions& options, std::vector<float>& dx, Trainables& grads) const;
  const float* weight(const std::string& name) const;
  bool adapted(int layer, lora::LoraTarget target) const;
  LoraShape lora_shape(int layer, lora::LoraTarget target, std::int64_t tokens,
                       const GradOptions& options) const;

  io::ModelConfig config_;
  std::map<std::string, std::vector<float>> params_;  // base weights and LoRA factors
  std::string lm_head_name_;
  std::vector<std::string> trainable_;
  bool lora_mode_ = false;
  lora::LoraConfig lora_config_;
};

}  // namespace qg::train
