// CudaModelGrad: the loss and LoRA gradients of a ChatGLM model on one GPU, the engine of
// `qg-train --device cuda` (through make_cuda_trainable_model, trainable_model.h). Only in
// builds with CUDA (QG_WITH_CUDA).
//
// The computation is ModelGrad's (reference_model_grad.h, the CPU oracle it is tested
// against) with fp16 weights and activations, fp32 accumulation and statistics:
//   forward per layer   a = LN1(x); qkv = a Wqkv^T + b + lora; rotary; attention (keeps lse);
//                       h = a*alpha + attn Wd^T + b + lora; m = LN2(h);
//                       f = m W1^T + b1 + lora; x' = m*alpha + gelu(f) W2^T + b2 + lora
//   loss                final LN, fused vocabulary cross-entropy (loss-scaled dhidden)
//   backward per layer  the same ops reversed; input gradients by gemm_f16_nn against the
//                       frozen weights (no transposed copies), LoRA dA/dB in fp32
// A micro-batch's sequences are packed row after row (no padding); each attends only to
// itself. Frozen base weights take no gradient memory; the LoRA factors are fp32 on the device
// (the optimizer's masters stay on the host and are copied in by set_parameter). With
// activation checkpointing only each layer's input is kept and the layer is recomputed in the
// backward. The dropout masks are ModelGrad's, so with the same seeds both engines compute the
// same function.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qinggeng/io/model_config.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/train/dataset.h"
#include "qinggeng/train/reference_model_grad.h"

namespace qg::train {

/// \brief Settings of a CudaModelGrad.
struct CudaGradOptions {
  bool checkpoint_layers = false;  ///< keep only layer inputs; recompute in the backward
  std::int64_t ce_row_chunk = 512;  ///< rows of logits held at once by the cross-entropy
  /// Adds each LoRA forward term inside its base GEMM (gemm_f16's GemmLowRank: extra K slices
  /// of u and scale * B in fp16, y rounded once) instead of a separate pass that reads and
  /// writes the layer's output. Same function within fp16 rounding; off by default until it
  /// is timed on a GPU (docs/training-gpu.md).
  bool lora_in_gemm = false;
  /// Runs the LoRA passes over the activations on tensor cores (cuda::LoraTrainKernels::
  /// TensorCores: ranks up to 16) instead of fp32 FMAs. Same function within fp32 rounding;
  /// off by default until it is timed on a GPU.
  bool lora_tensor_cores = false;
  /// Runs the last layer after its attention (dense, LayerNorm, MLP, their LoRA terms) and the
  /// final LayerNorm on the labelled rows only: the prompt's rows there feed nothing but
  /// logits that have no loss (their keys and values, which later rows attend to, come
  /// before). About 40% of that work in MedicalGPT-zh's batches. Same function; off by
  /// default until it is timed on a GPU.
  bool last_layer_labelled_rows = false;
  /// Lets the attention backward hand dq and dk back inverse-rotated (the rotary's backward)
  /// instead of a separate pass over them. The same bits; off by default until it is timed on
  /// a GPU.
  bool rotary_in_attention_backward = false;
};

/// \brief Device memory of a training step, by purpose (bytes).
struct CudaTrainMemoryPlan {
  std::size_t weights = 0;      ///< frozen fp16 base weights
  std::size_t lora = 0;         ///< fp32 LoRA factors and their gradients
  std::size_t activations = 0;  ///< kept for the backward (all layers, or layer inputs)
  std::size_t workspace = 0;    ///< backward scratch, cross-entropy logits, attention
  std::size_t total() const { return weights + lora + activations + workspace; }
  /// \brief "weights 11.6 GiB + LoRA 0.03 GiB + activations 5.2 GiB + workspace 1.1 GiB =
  /// 17.9 GiB" style line.
  std::string to_string() const;
};

/// \brief LoRA training step of a ChatGLM model on one GPU.
class CudaModelGrad {
 public:
  /// \brief Uploads the base weights from `source` (fp16 on GPU `device`) and the factors of
  /// `adapter` (its targets, rank, scale and dropout are the trained configuration).
  /// \throws qg::Error when there is no such GPU, a weight is missing or mis-shaped, the
  /// adapter was made for another model, or the weights do not fit the GPU's memory.
  CudaModelGrad(const io::ModelConfig& config, const model::GlmModel::WeightSource& source,
                const lora::LoraAdapter& adapter, int device, const CudaGradOptions& options = {});
  ~CudaModelGrad();
  CudaModelGrad(const CudaModelGrad&) = delete;
  CudaModelGrad& operator=(const CudaModelGrad&) = delete;

  /// \brief "cuda:0 (NVIDIA H100 ...)".
  std::string device_name() const;
  /// \brief PEFT names of the trained factors, in model order (as ModelGrad::trainable()).
  const std::vector<std::string>& trainable() const;
  /// \brief Element count of a trainable factor. \throws qg::Error for an unknown name.
  std::size_t parameter_size(const std::string& name) const;
  /// \brief Copies new fp32 values of a factor to the device.
  /// \throws qg::Error for an unknown name or a wrong length.
  void set_parameter(const std::string& name, const std::vector<float>& values);
  /// \brief set_parameter for every entry of `values` (name -> values) with one stream
  /// synchronisation at the end (the per-step upload of the optimizer's masters).
  void set_parameters(const std::map<std::string, std::vector<float>>& values);
  /// \brief The adapter's configuration (targets, r, alpha, dropout) being trained.
  const lora::LoraConfig& lora_config() const;

  /// \brief Loss and gradient of every factor over a packed micro-batch: loss = summed NLL of
  /// all its scored tokens / `normalizer`; example k's dropout comes from dropout_seeds[k]
  /// (ModelGrad with GradOptions::dropout_seed = dropout_seeds[k]; `dropout` false disables
  /// it). The backward runs on loss * loss_scale in fp16; the returned gradients are divided
  /// back (inf/NaN after an fp16 overflow). LossAndGrad::tokens counts scored tokens.
  /// \throws qg::Error naming the field for an example that does not fit the model.
  LossAndGrad loss_and_grad(const std::vector<const TrainingExample*>& batch,
                            const std::vector<std::uint64_t>& dropout_seeds, double normalizer,
                            float loss_scale = 1.0f, bool dropout = true);

  /// \brief Summed NLL of each example's scored tokens (forward only, no dropout).
  std::vector<double> summed_nll(const std::vector<const TrainingExample*>& batch);

  /// \brief Runs forward and backward of a packed batch leaving the gradients on the device
  /// (no host copies): what a benchmark times. Synchronises before returning.
  void benchmark_step(const std::vector<const TrainingExample*>& batch, float loss_scale);

  /// \brief The memory a step of `tokens` packed tokens needs (weights and LoRA as loaded).
  CudaTrainMemoryPlan memory_plan(std::int64_t tokens) const;
  /// \brief Allocates the activations and workspace of `tokens`-token micro-batches now.
  /// \throws qg::Error naming the plan when the GPU does not have the memory.
  void reserve(std::int64_t tokens);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::train
