// Dynamic loss scaling for fp16 training: the loss is multiplied by scale() before backward so
// small gradients survive fp16; the fp32 master gradients are divided back (unscale) before
// clipping and the update. An inf/NaN gradient means the scale was too large: the step is
// skipped and the scale halved; after growth_interval clean steps it doubles. Same policy and
// defaults as torch.cuda.amp.GradScaler.
#pragma once

#include <cstdint>
#include <vector>

#include "qinggeng/train/optimizer.h"

namespace qg::train {

/// \brief Policy of a LossScaler.
struct LossScalerConfig {
  bool enabled = true;          ///< false: scale stays 1 (fp32 / bf16 training); a
                                ///< non-finite step is still skipped
  float init_scale = 65536.0f;  ///< 2^16
  float growth_factor = 2.0f;
  float backoff_factor = 0.5f;
  int growth_interval = 2000;     ///< clean steps before the scale grows
  float min_scale = 1.0f;         ///< the scale never backs off below this
  float max_scale = 16777216.0f;  ///< 2^24: nor grows above this
};

/// \brief The part of a LossScaler that changes during training (saved in checkpoints).
struct LossScalerState {
  float scale = 65536.0f;
  std::int64_t clean_steps = 0;    ///< clean steps since the last growth or overflow
  std::int64_t skipped_steps = 0;  ///< total steps skipped for overflow
};

/// \brief Dynamic loss scaler.
class LossScaler {
 public:
  /// \throws qg::Error naming the field for a non-positive scale or interval, growth_factor
  /// <= 1, backoff_factor outside (0, 1), or min_scale > init_scale.
  explicit LossScaler(LossScalerConfig config = {});

  /// \brief Multiplier of the loss for backward (1 when disabled).
  float scale() const { return config_.enabled ? state_.scale : 1.0f; }

  /// \brief Divides every gradient by scale() and reports whether all of them are finite.
  /// Non-finite gradients are left as they are (the step will be skipped).
  bool unscale(const std::vector<ParamRef>& params) const;

  /// \brief Records the outcome of a step's gradients and returns whether to apply the
  /// update: false (skip) after an overflow, which also multiplies the scale by
  /// backoff_factor; true otherwise, growing the scale after growth_interval clean steps.
  bool update(bool grads_finite);

  const LossScalerConfig& config() const { return config_; }
  const LossScalerState& state() const { return state_; }
  /// \brief Restores a saved state; \throws qg::Error for a non-positive scale.
  void set_state(const LossScalerState& state);

 private:
  LossScalerConfig config_;
  LossScalerState state_;
};

}  // namespace qg::train
