// Resumable training state on disk. A checkpoint is a directory
//   <root>/checkpoint-<step, 8 digits>/
//     train_state.safetensors  master values ("<param>") and optimizer moments
//                              ("<param>.exp_avg", "<param>.exp_avg_sq") in float32
//     train_state.json         the manifest: counters, data position, RNG, loss scaler,
//                              schedule, optimizer settings, parameter list, and the size and
//                              FNV-1a hash of the tensor file
// built under a temporary name in <root> and renamed into place only when complete, so a
// crash never leaves a checkpoint-* directory that loads half a state. Loading checks the
// manifest against the file and the parameters against the optimizer, and names the file and
// field of any mismatch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "qinggeng/train/loss_scaler.h"
#include "qinggeng/train/optimizer.h"
#include "qinggeng/train/schedule.h"

namespace qg::train {

/// \brief Everything besides the tensors that a resumed run needs to continue exactly.
struct TrainState {
  std::int64_t step = 0;  ///< training steps done (skipped overflow steps included)
  std::int64_t epoch = 0;
  std::string data_position;  ///< opaque bytes from the data pipeline (any content)
  std::string rng;            ///< serialised generator (rng_to_string)
  LossScalerState loss_scaler;
  LrSchedule schedule;  ///< lr of the next update is schedule.lr(step)
  double best_eval_loss = std::numeric_limits<double>::infinity();  ///< inf: no eval yet
};

/// \brief The text form of a generator's state (std::mt19937_64's stream format).
std::string rng_to_string(const std::mt19937_64& rng);
/// \brief Restores a generator from rng_to_string text; \throws qg::Error naming `origin`
/// when the text is not a complete state.
std::mt19937_64 rng_from_string(const std::string& text, const std::string& origin);

/// \brief Name of the checkpoint directory for `step`: "checkpoint-00000123".
std::string checkpoint_dir_name(std::int64_t step);

/// \brief Writes `state` and `optimizer` (master values and moments) to
/// `root`/checkpoint_dir_name(state.step) atomically, replacing one of the same step, then
/// deletes all but the newest `keep_last` checkpoints (0 keeps all) and temporary
/// directories that crashed saves left in `root`.
/// \return the checkpoint directory.
/// \throws qg::Error naming the path when a file cannot be written.
std::filesystem::path save_checkpoint(const std::filesystem::path& root, const TrainState& state,
                                      Optimizer& optimizer, int keep_last = 0);

/// \brief Reads checkpoint directory `dir` into `state` and `optimizer`, whose parameters
/// must be the saved ones (same names, order and sizes) and whose kind must match.
/// Master values, moments and the step count are restored; the optimizer's other
/// hyper-parameters stay as configured. Nothing is modified unless everything validates.
/// \throws qg::Error naming the file and field or tensor for a missing or corrupt file,
/// a size or hash mismatch, an unknown format version, a parameter mismatch or a wrong kind.
void load_checkpoint(const std::filesystem::path& dir, TrainState& state, Optimizer& optimizer);

/// \brief The checkpoint-* directories of `root` that have a manifest, oldest step first
/// (none when `root` does not exist).
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& root);

/// \brief The newest checkpoint of `root`, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& root);

}  // namespace qg::train
