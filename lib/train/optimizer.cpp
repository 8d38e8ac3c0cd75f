// Host Lion and AdamW, gradient zeroing, accumulation and global-norm clipping (optimizer.h).
#include "qinggeng/train/optimizer.h"

#include <cmath>
#include <set>

#include "qinggeng/error.h"

namespace qg::train {

OptimizerConfig OptimizerConfig::lion(float weight_decay) {
  OptimizerConfig c;
  c.kind = OptimizerKind::Lion;
  c.beta1 = 0.9f;
  c.beta2 = 0.99f;
  c.weight_decay = weight_decay;
  return c;
}

OptimizerConfig OptimizerConfig::adamw(float weight_decay) {
  OptimizerConfig c;
  c.kind = OptimizerKind::AdamW;
  c.beta1 = 0.9f;
  c.beta2 = 0.999f;
  c.eps = 1e-8f;
  c.weight_decay = weight_decay;
  return c;
}

const char* optimizer_kind_name(OptimizerKind kind) {
  return kind == OptimizerKind::Lion ? "lion" : "adamw";
}

OptimizerKind parse_optimizer_kind(const std::string& name, const std::string& origin) {
  if (name == "lion") return OptimizerKind::Lion;
  if (name == "adamw") return OptimizerKind::AdamW;
  fail(origin, ": unknown optimizer \"", name, "\" (expected \"lion\" or \"adamw\")");
}

Optimizer::Optimizer(OptimizerConfig config, std::vector<ParamRef> params)
    : config_(config), params_(std::move(params)) {
  QG_CHECK(config_.beta1 >= 0 && config_.beta1 < 1, "optimizer: beta1 must be in [0, 1), got ",
           config_.beta1);
  QG_CHECK(config_.beta2 >= 0 && config_.beta2 < 1, "optimizer: beta2 must be in [0, 1), got ",
           config_.beta2);
  QG_CHECK(config_.eps >= 0, "optimizer: eps must be >= 0, got ", config_.eps);
  QG_CHECK(config_.weight_decay >= 0, "optimizer: weight_decay must be >= 0, got ",
           config_.weight_decay);
  QG_CHECK(!params_.empty(), "optimizer: no parameters to train");
  std::set<std::string> seen;
  for (const ParamRef& p : params_) {
    QG_CHECK(!p.name.empty(), "optimizer: a parameter has an empty name");
    QG_CHECK(seen.insert(p.name).second, "optimizer: parameter ", p.name, " is listed twice");
    QG_CHECK(p.n == 0 || (p.value != nullptr && p.grad != nullptr), "optimizer: parameter ", p.name,
             " has no value or gradient buffer");
    exp_avg_.emplace_back(p.n, 0.0f);
    if (config_.kind == OptimizerKind::AdamW) exp_avg_sq_.emplace_back(p.n, 0.0f);
  }
}

void Optimizer::set_steps(std::int64_t steps) {
  QG_CHECK(steps >= 0, "optimizer: step count must be >= 0, got ", steps);
  steps_ = steps;
}

std::vector<OptimizerSlot> Optimizer::slots() {
  std::vector<OptimizerSlot> out;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    out.push_back({params_[i].name + ".exp_avg", i, exp_avg_[i].data()});
    if (!exp_avg_sq_.empty())
      out.push_back({params_[i].name + ".exp_avg_sq", i, exp_avg_sq_[i].data()});
  }
  return out;
}

void Optimizer::step(float lr) {
  ++steps_;
  const float b1 = config_.beta1, b2 = config_.beta2;
  // AdamW's bias corrections in double, as PyTorch computes them on the Python side.
  const double t = static_cast<double>(steps_);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(double(b1), t)));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(double(b2), t)));
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& p = params_[i];
    const float keep = p.decay ? 1.0f - lr * config_.weight_decay : 1.0f;
    float* m = exp_avg_[i].data();
    if (config_.kind == OptimizerKind::Lion) {
      for (std::size_t j = 0; j < p.n; ++j) {
        const float g = p.grad[j];
        const float c = b1 * m[j] + (1.0f - b1) * g;
        const float sign = c > 0 ? 1.0f : (c < 0 ? -1.0f : 0.0f);
        p.value[j] = p.value[j] * keep - lr * sign;
        m[j] = b2 * m[j] + (1.0f - b2) * g;
      }
    } else {
      float* v = exp_avg_sq_[i].data();
      for (std::size_t j = 0; j < p.n; ++j) {
        const float g = p.grad[j];
        m[j] = b1 * m[j] + (1.0f - b1) * g;
        v[j] = b2 * v[j] + (1.0f - b2) * g * g;
        const float denom = std::sqrt(v[j]) / bc2_sqrt + config_.eps;
        p.value[j] = p.value[j] * keep - step_size * (m[j] / denom);
      }
    }
  }
}

void zero_grads(const std::vector<ParamRef>& params) {
  for (const ParamRef& p : params) std::fill(p.grad, p.grad + p.n, 0.0f);
}

ClipResult clip_grad_norm(const std::vector<ParamRef>& params, double max_norm) {
  double sum = 0;
  for (const ParamRef& p : params) {
    for (std::size_t j = 0; j < p.n; ++j) sum += static_cast<double>(p.grad[j]) * p.grad[j];
  }
  ClipResult result;
  result.norm = std::sqrt(sum);
  result.finite = std::isfinite(result.norm);
  if (!result.finite || max_norm <= 0) return result;
  const double coef = max_norm / (result.norm + 1e-6);
  if (coef >= 1.0) return result;
  const float f = static_cast<float>(coef);
  for (const ParamRef& p : params) {
    for (std::size_t j = 0; j < p.n; ++j) p.grad[j] *= f;
  }
  return result;
}

GradAccumulator::GradAccumulator(int micro_batches) : micro_batches_(micro_batches) {
  QG_CHECK(micro_batches >= 1, "gradient accumulation: micro_batches must be >= 1, got ",
           micro_batches);
}

bool GradAccumulator::add(const std::vector<ParamRef>& params) {
  if (++pending_ < micro_batches_) return false;
  pending_ = 0;
  if (micro_batches_ > 1) {
    const float inv = 1.0f / static_cast<float>(micro_batches_);
    for (const ParamRef& p : params) {
      for (std::size_t j = 0; j < p.n; ++j) p.grad[j] *= inv;
    }
  }
  return true;
}

}  // namespace qg::train
