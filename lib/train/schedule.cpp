// Warmup + constant / linear / cosine learning-rate schedules (schedule.h).
#include "qinggeng/train/schedule.h"

#include <algorithm>
#include <cmath>

#include "qinggeng/error.h"

namespace qg::train {
namespace {
constexpr double kPi = 3.14159265358979323846;
}  // namespace

const char* decay_kind_name(DecayKind kind) {
  switch (kind) {
    case DecayKind::Constant:
      return "constant";
    case DecayKind::Linear:
      return "linear";
    case DecayKind::Cosine:
      return "cosine";
  }
  return "";
}

DecayKind parse_decay_kind(const std::string& name, const std::string& origin) {
  for (DecayKind k : {DecayKind::Constant, DecayKind::Linear, DecayKind::Cosine}) {
    if (name == decay_kind_name(k)) return k;
  }
  fail(origin, ": unknown schedule \"", name, "\" (expected constant, linear or cosine)");
}

LrSchedule LrSchedule::medicalgpt_zh(std::int64_t total_steps) {
  LrSchedule s;
  s.peak_lr = 1e-4;
  s.warmup_steps = 5000;
  s.total_steps = total_steps;
  s.decay = DecayKind::Linear;
  s.min_ratio = 0.0;
  return s;
}

void LrSchedule::validate() const {
  QG_CHECK(peak_lr >= 0 && std::isfinite(peak_lr), "lr schedule: peak_lr must be >= 0, got ",
           peak_lr);
  QG_CHECK(warmup_steps >= 0, "lr schedule: warmup_steps must be >= 0, got ", warmup_steps);
  QG_CHECK(min_ratio >= 0 && min_ratio <= 1, "lr schedule: min_ratio must be in [0, 1], got ",
           min_ratio);
  if (decay != DecayKind::Constant) {
    QG_CHECK(total_steps > warmup_steps, "lr schedule: total_steps (", total_steps,
             ") must exceed warmup_steps (", warmup_steps, ") for a ", decay_kind_name(decay),
             " decay");
  }
}

double LrSchedule::lr(std::int64_t step) const {
  step = std::max<std::int64_t>(step, 0);
  if (step < warmup_steps) {
    return peak_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  }
  if (decay == DecayKind::Constant) return peak_lr;
  const double span = static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / span);
  const double shape =
      decay == DecayKind::Linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(kPi * progress));
  return peak_lr * (min_ratio + (1.0 - min_ratio) * shape);
}

}  // namespace qg::train
