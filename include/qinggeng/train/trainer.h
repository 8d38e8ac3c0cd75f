// Trainer: the training loop of qg-train, for LoRA adapters (CPU or GPU, trainable_model.h)
// or full-parameter training of small models (CPU). It ties together the pieces of this directory:
// BatchPlanner batches -> per-example ModelGrad gradients (the loss normalised over the
// batch's scored tokens) -> gradient accumulation -> clipping -> Lion/AdamW with a warmup
// schedule, with periodic evaluation, metrics (JSONL + TensorBoard), resumable checkpoints and
// an atomic final output (a PEFT adapter, or a complete model directory).
//
// Output directory layout:
//   <output>/checkpoints/checkpoint-<step>/   resumable state (checkpoint.h), newest K kept
//   <output>/metrics.jsonl                    one line per step (and per evaluation)
//   <output>/tensorboard/events.out.tfevents.* the same scalars for TensorBoard
//   <output>/adapter_config.json + adapter_model.safetensors            (LoRA mode), or
//   <output>/config.json + model.safetensors + tokenizer files           (full mode)
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/tensor/dtype.h"
#include "qinggeng/train/dataset.h"
#include "qinggeng/train/optimizer.h"
#include "qinggeng/train/schedule.h"

namespace qg::train {

/// \brief What is trained.
enum class TrainMode {
  kLora,  ///< LoRA factors of the chosen targets; base weights frozen
  kFull,  ///< every weight (small models only: the optimizer keeps two fp32 copies)
};

/// \brief Parses "lora" / "full"; \throws qg::Error naming `origin` otherwise.
TrainMode parse_train_mode(const std::string& name, const std::string& origin);

/// \brief Parses a comma-separated list of LoRA targets ("query_key_value,dense,...": the
/// module names PEFT uses). \throws qg::Error naming `origin` and the unknown name.
std::vector<lora::LoraTarget> parse_lora_targets(const std::string& list,
                                                 const std::string& origin);

/// \brief Every setting of a training run.
struct TrainerConfig {
  TrainMode mode = TrainMode::kLora;
  // LoRA (MedicalGPT-zh's recipe by default).
  std::vector<lora::LoraTarget> lora_targets = {lora::LoraTarget::QueryKeyValue};
  std::int64_t lora_r = 8;
  double lora_alpha = 16;
  double lora_dropout = 0.1;
  // Optimizer and schedule.
  OptimizerKind optimizer = OptimizerKind::Lion;
  double lr = 1e-4;
  double weight_decay = 0.0;  ///< decoupled; never applied to biases and LayerNorms
  /// Warmup steps; negative: MedicalGPT-zh's 5000, or a tenth of the run when that is shorter.
  std::int64_t warmup_steps = 0;
  DecayKind decay = DecayKind::Linear;
  double clip = 1.0;   ///< global gradient norm limit; <= 0 disables clipping
  int grad_accum = 1;  ///< micro-batches per optimizer step
  // Batches.
  std::size_t batch_size = 4;  ///< examples per micro-batch (0: only max_tokens limits)
  std::size_t max_tokens = 0;  ///< padded-token budget per micro-batch (0: none)
  // Length. max_steps > 0 wins over epochs; otherwise the run is `epochs` passes over the
  // training examples (rounded up to whole optimizer steps).
  std::int64_t max_steps = 0;
  int epochs = 1;
  // Evaluation, checkpoints, output.
  std::int64_t eval_every = 0;      ///< steps between evaluations (0: only at the end)
  std::int64_t save_every = 0;      ///< steps between checkpoints (0: only on stop requests)
  int keep_checkpoints = 2;         ///< newest checkpoints kept (0: all)
  DType output_dtype = DType::F16;  ///< dtype of the final adapter or model weights
  bool checkpoint_layers = false;   ///< activation checkpointing in ModelGrad
  int threads = 0;         ///< examples of a batch computed in parallel (0: hardware threads)
  /// "cpu" (the float32 reference) or "cuda" / "cuda:N" (fp16 with loss scaling, LoRA only).
  std::string device = "cpu";
  std::uint64_t seed = 1;  ///< data order, LoRA initialisation and dropout

  /// \brief \throws qg::Error naming the field for an out-of-range setting.
  void validate() const;
};

/// \brief One optimizer step, as reported to the progress callback and the metrics.
struct StepReport {
  std::int64_t step = 0;  ///< steps done after this one (1-based)
  std::int64_t total_steps = 0;
  double loss = 0;                  ///< mean NLL over the step's scored tokens
  double lr = 0;                    ///< learning rate the step used
  double grad_norm = 0;             ///< global norm before clipping
  std::int64_t tokens = 0;          ///< tokens (prompt + answer) of the step
  double tokens_per_second = 0;     ///< over this run so far (resumed runs count from resume)
  double seconds = 0;               ///< wall time of this run so far
  std::optional<double> eval_loss;  ///< set when the step ended with an evaluation
};

/// \brief Loss of the held-out examples (no dropout): NLL averaged over scored tokens.
struct EvalReport {
  double loss = 0;
  double perplexity = 0;  ///< exp(loss)
  std::int64_t tokens = 0;
};

/// \brief How Trainer::run ended.
struct TrainResult {
  std::int64_t steps = 0;      ///< steps done in total (earlier runs included)
  bool stopped = false;        ///< a stop request ended it early (a checkpoint was saved)
  std::vector<double> losses;  ///< loss of every step this run took, in order
  std::optional<EvalReport> final_eval;
  std::filesystem::path output;  ///< the written adapter / model directory (empty if stopped)
};

/// \brief Trains a model from a Hugging Face directory on already laid-out examples.
class Trainer {
 public:
  /// \brief Loads the model of `model_dir` (config.json + weights) into the CPU reference,
  /// with fresh LoRA factors (A uniform in +-1/sqrt(in) as PEFT's Kaiming init, B zero) in
  /// LoRA mode. `eval` may be empty (no evaluation).
  /// \throws qg::Error for an invalid config, no training examples, an example longer than
  /// the model's max_sequence_length, `output_dir` equal to `model_dir`, or a model that
  /// cannot be loaded.
  Trainer(const std::filesystem::path& model_dir, std::vector<TrainingExample> train,
          std::vector<TrainingExample> eval, const TrainerConfig& config,
          const std::filesystem::path& output_dir);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// \brief Continues from the newest checkpoint of `output_dir`/checkpoints, if any.
  /// \return the step it resumed at, or nothing when there is no checkpoint.
  /// \throws qg::Error when the checkpoint does not match this run (other data, options,
  /// parameters or optimizer) or is damaged.
  std::optional<std::int64_t> resume();

  /// \brief Trains until the total number of steps, then evaluates (when there are eval
  /// examples) and writes the final adapter or model into the output directory.
  ///
  /// `stop` (may be null) is polled between steps: when it becomes true a checkpoint is saved
  /// and run returns with TrainResult::stopped set, without writing the final output.
  /// `on_step` (may be empty) is called after every step.
  TrainResult run(const std::atomic<bool>* stop = nullptr,
                  const std::function<void(const StepReport&)>& on_step = {});

  /// \brief Loss and perplexity of the held-out examples with the current parameters.
  /// \throws qg::Error when there are no eval examples.
  EvalReport evaluate() const;

  /// \brief Steps of the whole run (max_steps, or the epochs in steps).
  std::int64_t total_steps() const;
  /// \brief Warmup steps of the schedule (after resolving a negative setting).
  std::int64_t warmup_steps() const;
  /// \brief Steps done so far.
  std::int64_t step() const;
  /// \brief Where training runs ("cpu", "cuda:0 (NVIDIA ...)").
  std::string device_name() const;
  /// \brief The engine's memory plan for the largest micro-batch ("" on the CPU).
  const std::string& memory_plan() const;
  /// \brief Names of the trained parameters (LoRA factors or every weight).
  const std::vector<std::string>& trainable() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::train
