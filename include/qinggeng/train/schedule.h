// Learning-rate schedules: linear warmup, then constant, linear or cosine decay. The
// multipliers are those of Hugging Face transformers' get_{constant,linear,cosine}_schedule_
// with_warmup, so runs compare with the Trainer-based recipes (MedicalGPT-zh among them).
#pragma once

#include <cstdint>
#include <string>

namespace qg::train {

/// \brief What follows the warmup.
enum class DecayKind { Constant, Linear, Cosine };

/// \brief "constant", "linear" or "cosine".
const char* decay_kind_name(DecayKind kind);
/// \brief Parses a decay_kind_name; \throws qg::Error naming `origin` otherwise.
DecayKind parse_decay_kind(const std::string& name, const std::string& origin);

/// \brief A schedule; lr(step) is the rate of the update with 0-based index `step`.
///
/// factor(step) = step / warmup_steps while step < warmup_steps, then
///   Constant: 1
///   Linear:   min_ratio + (1 - min_ratio) * max(0, (total - step) / (total - warmup))
///   Cosine:   min_ratio + (1 - min_ratio) * (1 + cos(pi * min(1, progress))) / 2,
///             progress = (step - warmup) / (total - warmup)
/// and lr(step) = peak_lr * factor(step). As in transformers, update 0 gets lr 0 when there
/// is a warmup.
struct LrSchedule {
  double peak_lr = 1e-4;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 0;  ///< where Linear / Cosine reach min_ratio; unused by Constant
  DecayKind decay = DecayKind::Linear;
  double min_ratio = 0.0;  ///< floor of the decay, as a fraction of peak_lr

  /// \brief MedicalGPT-zh's recipe: peak 1e-4, 5000 warmup steps, linear decay to 0 at
  /// `total_steps`.
  static LrSchedule medicalgpt_zh(std::int64_t total_steps);

  /// \brief \throws qg::Error naming the field for a negative peak_lr or warmup, a decaying
  /// schedule whose total_steps does not exceed warmup_steps, or min_ratio outside [0, 1].
  void validate() const;
  /// \brief Learning rate of update `step` (0-based; negative counts as 0).
  double lr(std::int64_t step) const;
};

}  // namespace qg::train
