// TrainableModel: what the training loop (trainer.h) needs from a model, whatever runs it.
// Two implementations share the contract:
//   - the CPU reference (make_cpu_trainable_model): ModelGrad in float32, the examples of a
//     micro-batch computed in parallel on host threads; LoRA or full-parameter training;
//   - the CUDA engine (make_cuda_trainable_model, cuda_model_grad.h): fp16 weights and
//     activations on one GPU with fp32 accumulation, fp16 loss scaling and optional
//     activation checkpointing; LoRA training of models up to ChatGLM-6B.
// Either way the fp32 master copies of the trained parameters live on the host, where the
// optimizer (optimizer.h) updates them; parameters_updated() hands the new values back to the
// engine. Gradients come back unscaled, already divided by the caller's normalizer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qinggeng/io/model_config.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/train/dataset.h"

namespace qg::train {

/// \brief Loss of one micro-batch, as add_gradients reports it.
struct MicroBatchLoss {
  double loss = 0;          ///< summed NLL of the batch's scored tokens / normalizer
  std::int64_t tokens = 0;  ///< tokens of the batch (prompt and answer)
};

/// \brief A model being trained, on some device.
class TrainableModel {
 public:
  virtual ~TrainableModel() = default;

  /// \brief "cpu" or "cuda:0 (NVIDIA H100 ...)": where the work runs, for logs.
  virtual std::string device_name() const = 0;
  /// \brief Names of the trained parameters, in model order (LoRA factors under their PEFT
  /// names, or every weight under its checkpoint name).
  virtual const std::vector<std::string>& trainable() const = 0;
  /// \brief The fp32 master values of a parameter (host memory, updated in place by the
  /// optimizer). \throws qg::Error for an unknown name.
  virtual std::vector<float>& parameter(const std::string& name) = 0;
  /// \brief Tells the engine that the master values changed (it copies them to the device).
  virtual void parameters_updated() = 0;
  /// \brief LoRA mode: the current factors as an adapter. \throws qg::Error in full mode.
  virtual lora::LoraAdapter adapter() const = 0;

  /// \brief Adds d(loss)/d(parameter) of a micro-batch into `grads` (one entry per trainable
  /// name, sized like the parameter), where loss = summed NLL of the batch / `normalizer`.
  /// Example k draws its LoRA dropout masks from dropout_seeds[k] (the masks of ModelGrad with
  /// GradOptions::dropout_seed = dropout_seeds[k]). `loss_scale` multiplies the loss before an
  /// fp16 backward (ignored by fp32 engines); the gradients added are divided back by it, and
  /// an overflow shows as inf/NaN in them.
  /// \throws qg::Error naming the field for an example that does not fit the model.
  virtual MicroBatchLoss add_gradients(const std::vector<const TrainingExample*>& batch,
                                       const std::vector<std::uint64_t>& dropout_seeds,
                                       double normalizer, float loss_scale,
                                       std::map<std::string, std::vector<float>>& grads) = 0;

  /// \brief Summed NLL of each example's scored tokens without dropout (evaluation).
  virtual std::vector<double> summed_nll(const std::vector<const TrainingExample*>& batch) = 0;

  /// \brief Whether add_gradients computes in fp16 (the trainer then uses a loss scaler).
  virtual bool uses_loss_scaling() const = 0;

  /// \brief Sets aside what micro-batches of up to `tokens` tokens need, so a run that cannot
  /// fit fails before its first step, and returns the memory plan as one line ("" when the
  /// engine has none to report). \throws qg::Error (with the plan) when it does not fit.
  virtual std::string reserve(std::int64_t tokens) { (void)tokens; return {}; }
};

/// \brief How a TrainableModel is built.
struct TrainableModelOptions {
  bool full_parameter = false;     ///< train every weight (CPU only) instead of the adapter
  bool checkpoint_layers = false;  ///< activation checkpointing per layer
  int threads = 0;                 ///< CPU: examples computed in parallel (0: hardware)
};

/// \brief The CPU reference engine (ModelGrad). `adapter` gives the initial LoRA factors and
/// settings (ignored in full mode).
/// \throws qg::Error for a missing or mis-shaped weight.
std::unique_ptr<TrainableModel> make_cpu_trainable_model(const io::ModelConfig& config,
                                                         const io::WeightStore& store,
                                                         const lora::LoraAdapter& adapter,
                                                         const TrainableModelOptions& options);

/// \brief The CUDA engine on GPU `device`, LoRA only. Prints nothing; its memory plan is
/// available from cuda_model_grad.h.
/// \throws qg::Error when this build has no CUDA, no such GPU exists, full-parameter mode is
/// asked for, or the model does not fit the GPU's memory (with the plan in the message).
std::unique_ptr<TrainableModel> make_cuda_trainable_model(const io::ModelConfig& config,
                                                          const io::WeightStore& store,
                                                          const lora::LoraAdapter& adapter,
                                                          const TrainableModelOptions& options,
                                                          int device);

}  // namespace qg::train
