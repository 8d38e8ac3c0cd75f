// Dynamic fp16 loss scaling (loss_scaler.h).
#include "qinggeng/train/loss_scaler.h"

#include <algorithm>
#include <cmath>

#include "qinggeng/error.h"

namespace qg::train {

LossScaler::LossScaler(LossScalerConfig config) : config_(config) {
  QG_CHECK(config_.init_scale > 0 && std::isfinite(config_.init_scale),
           "loss scaler: init_scale must be positive, got ", config_.init_scale);
  QG_CHECK(config_.growth_factor > 1, "loss scaler: growth_factor must exceed 1, got ",
           config_.growth_factor);
  QG_CHECK(config_.backoff_factor > 0 && config_.backoff_factor < 1,
           "loss scaler: backoff_factor must be in (0, 1), got ", config_.backoff_factor);
  QG_CHECK(config_.growth_interval >= 1, "loss scaler: growth_interval must be >= 1, got ",
           config_.growth_interval);
  QG_CHECK(config_.min_scale > 0 && config_.min_scale <= config_.init_scale &&
               config_.init_scale <= config_.max_scale,
           "loss scaler: need 0 < min_scale <= init_scale <= max_scale, got ", config_.min_scale,
           ", ", config_.init_scale, ", ", config_.max_scale);
  state_.scale = config_.init_scale;
}

bool LossScaler::unscale(const std::vector<ParamRef>& params) const {
  bool finite = true;
  for (const ParamRef& p : params) {
    for (std::size_t j = 0; j < p.n && finite; ++j) finite = std::isfinite(p.grad[j]);
  }
  if (!finite || !config_.enabled) return finite;
  // A power-of-two scale makes the multiply by its inverse exact (as GradScaler does it).
  const float inv = 1.0f / state_.scale;
  for (const ParamRef& p : params) {
    for (std::size_t j = 0; j < p.n; ++j) p.grad[j] *= inv;
  }
  return true;
}

bool LossScaler::update(bool grads_finite) {
  if (!grads_finite) {
    ++state_.skipped_steps;
    state_.clean_steps = 0;
    if (config_.enabled) {
      state_.scale = std::max(config_.min_scale, state_.scale * config_.backoff_factor);
    }
    return false;
  }
  if (config_.enabled && ++state_.clean_steps >= config_.growth_interval) {
    state_.clean_steps = 0;
    state_.scale = std::min(config_.max_scale, state_.scale * config_.growth_factor);
  }
  return true;
}

void LossScaler::set_state(const LossScalerState& state) {
  QG_CHECK(state.scale > 0 && std::isfinite(state.scale),
           "loss scaler: saved scale must be positive, got ", state.scale);
  QG_CHECK(state.clean_steps >= 0 && state.skipped_steps >= 0,
           "loss scaler: saved step counts must be >= 0");
  state_ = state;
}

}  // namespace qg::train
