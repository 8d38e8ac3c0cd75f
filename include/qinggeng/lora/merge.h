// Folding a LoRA adapter into the base weights (W += scale * B A) so the merged model runs
// with no adapter at all; the runtime alternative, which keeps several adapters live in one
// batch, is lora_add.h / cuda/lora.h.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/lora_adapter.h"

namespace qg::lora {

/// \brief w[out, in] += f.scale * f.b[out, r] · f.a[r, in] in place (float32).
/// An empty `f` (rank 0) leaves w unchanged.
void merge_factors(float* w, std::int64_t out, std::int64_t in, const LoraFactors& f);

/// \brief Options of merge_lora.
struct MergeOptions {
  /// Largest shard of the output (tensor bytes); one model.safetensors when everything fits.
  std::uint64_t max_shard_bytes = std::uint64_t{2} << 30;
  /// Copy the other files of the base directory (config.json, tokenizer files, ...), so the
  /// output is a complete model directory. Checkpoint files are never copied.
  bool copy_other_files = true;
};

/// \brief Writes `base` with `adapter` merged in as a safetensors checkpoint in `out_dir`.
///
/// Every tensor keeps its name and dtype; each adapted Linear weight is converted to float32,
/// gets scale * B A added, and is rounded back to its stored dtype. Shards are written one at
/// a time (atomically), so memory holds at most one shard's merged weights.
/// \return the files written (shards, then the index if there are several shards).
/// \throws qg::Error naming the tensor when a weight the adapter targets is missing or not
///         [out, in], or naming the file when writing fails; `out_dir` must not be the base
///         directory.
std::vector<std::filesystem::path> merge_lora(const io::WeightStore& base,
                                              const LoraAdapter& adapter,
                                              const std::filesystem::path& out_dir,
                                              const MergeOptions& options = {});

}  // namespace qg::lora
