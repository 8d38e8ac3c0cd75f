// Optimizers over named float32 parameters (the fp32 master copies of what is trained), plus
// the gradient bookkeeping around a step: zeroing, accumulation over micro-batches and
// global-norm clipping. These host versions are the reference the CUDA versions are tested
// against; their formulas are those of PyTorch's AdamW and of lion-pytorch, so a loss curve
// can be compared with a PyTorch run.
//
// A step, in the order a trainer calls things:
//   backward of k micro-batches, each adding into ParamRef::grad   (GradAccumulator::add)
//   LossScaler::unscale (fp16)  ->  clip_grad_norm  ->  Optimizer::step(schedule.lr(step))
//   zero_grads
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qg::train {

/// \brief One trainable tensor: its fp32 master values and gradient (same length), borrowed.
struct ParamRef {
  std::string name;        ///< unique; names the tensor in checkpoints and errors
  float* value = nullptr;  ///< [n] master values, updated in place by Optimizer::step
  float* grad = nullptr;   ///< [n] gradient of the (unscaled, averaged) loss
  std::size_t n = 0;
  bool decay = true;  ///< whether weight decay applies (off for biases, norms)
};

/// \brief The update rule.
enum class OptimizerKind { Lion, AdamW };

/// \brief Hyper-parameters; the learning rate comes per step from the schedule.
struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::Lion;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float eps = 1e-8f;          ///< AdamW only
  float weight_decay = 0.0f;  ///< decoupled: p *= 1 - lr * weight_decay before the update

  /// \brief Lion (Chen et al. 2023) with lion-pytorch's defaults: betas 0.9 / 0.99.
  static OptimizerConfig lion(float weight_decay = 0.0f);
  /// \brief AdamW with PyTorch's defaults: betas 0.9 / 0.999, eps 1e-8, weight decay 0.01.
  static OptimizerConfig adamw(float weight_decay = 0.01f);
};

/// \brief "lion" or "adamw".
const char* optimizer_kind_name(OptimizerKind kind);
/// \brief Parses "lion" / "adamw"; \throws qg::Error naming `origin` otherwise.
OptimizerKind parse_optimizer_kind(const std::string& name, const std::string& origin);

/// \brief One state buffer of the optimizer, borrowed from it: moments of one parameter.
struct OptimizerSlot {
  std::string name;       ///< "<param>.exp_avg" (Lion, AdamW) or "<param>.exp_avg_sq" (AdamW)
  std::size_t param = 0;  ///< index of the parameter in Optimizer::params()
  float* data = nullptr;  ///< [params()[param].n] values
};

/// \brief Lion or AdamW with per-parameter moments, zero-initialised.
///
/// Lion, per element (g the gradient, m the moment):
///   p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g
/// AdamW, per element, t the 1-based step count:
///   p *= 1 - lr*wd;  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g^2
///   p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
/// (weight decay only for parameters with decay set).
class Optimizer {
 public:
  /// \throws qg::Error for an empty, duplicate or null-pointer parameter (naming it) or a
  /// hyper-parameter out of range (beta outside [0, 1), negative eps or weight decay).
  Optimizer(OptimizerConfig config, std::vector<ParamRef> params);

  /// \brief Applies one update with learning rate `lr` to every parameter from its grad.
  void step(float lr);

  const OptimizerConfig& config() const { return config_; }
  const std::vector<ParamRef>& params() const { return params_; }
  /// \brief Updates applied so far (AdamW's bias-correction t is steps() after a step).
  std::int64_t steps() const { return steps_; }
  /// \brief Restores the step count (checkpoint resume).
  void set_steps(std::int64_t steps);
  /// \brief Every state buffer, parameters in order, exp_avg before exp_avg_sq.
  std::vector<OptimizerSlot> slots();

 private:
  OptimizerConfig config_;
  std::vector<ParamRef> params_;
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;  // [param][n]; exp_avg_sq AdamW only
  std::int64_t steps_ = 0;
};

/// \brief Sets every gradient to zero.
void zero_grads(const std::vector<ParamRef>& params);

/// \brief Result of clip_grad_norm.
struct ClipResult {
  double norm = 0;     ///< global L2 norm of all gradients before clipping (inf/NaN if so)
  bool finite = true;  ///< false when some gradient is inf or NaN: nothing was scaled
};

/// \brief Scales all gradients together so their global L2 norm is at most `max_norm`
/// (factor max_norm / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_; no change when the
/// norm is already below). A non-finite norm is reported, not applied: the caller skips
/// the step. `max_norm` <= 0 only measures.
ClipResult clip_grad_norm(const std::vector<ParamRef>& params, double max_norm);

/// \brief Gradient accumulation over `micro_batches` micro-batches whose backward adds into
/// the gradients: counts them and, at the last, divides the sums by the count so the
/// optimizer sees the mean gradient.
class GradAccumulator {
 public:
  /// \throws qg::Error when micro_batches < 1.
  explicit GradAccumulator(int micro_batches);

  /// \brief Records one micro-batch. Returns true when it completes an accumulation round;
  /// the gradients of `params` then hold the average and the count restarts.
  bool add(const std::vector<ParamRef>& params);
  /// \brief Micro-batches recorded in the current round.
  int pending() const { return pending_; }
  int micro_batches() const { return micro_batches_; }

 private:
  int micro_batches_;
  int pending_ = 0;
};

}  // namespace qg::train
