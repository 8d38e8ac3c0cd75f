// Checkpoint conversion: any checkpoint WeightStore reads (PyTorch .bin shards, safetensors) is
// rewritten as safetensors, optionally casting floating tensors to another dtype. This is the
// library side of the qg-convert app.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/tensor/dtype.h"

namespace qg::io {

/// \brief Progress of a conversion, reported after each tensor is converted.
struct ConvertProgress {
  std::size_t done = 0;     ///< tensors converted so far
  std::size_t total = 0;    ///< tensors to convert
  std::uint64_t bytes = 0;  ///< output tensor bytes written or staged so far
  std::string_view tensor;  ///< the tensor just converted
};

/// \brief What convert_checkpoint should do.
struct ConvertOptions {
  /// Target type of the floating tensors (F16, BF16, F32 or F64); nullopt keeps each tensor's
  /// stored type. Integer and bool tensors are always kept as stored.
  std::optional<DType> dtype;
  /// Largest total tensor bytes in one output shard (Hugging Face's "2GB" = 2e9 by default).
  std::uint64_t max_shard_bytes = 2'000'000'000;
  /// Keep the `*.rotary_emb.inv_freq` buffers (dropped by default: the model recomputes them).
  bool keep_buffers = false;
  /// Called after every tensor; may be empty.
  std::function<void(const ConvertProgress&)> on_progress;
};

/// \brief Summary of a finished conversion.
struct ConvertReport {
  std::size_t tensors_written = 0;
  std::size_t tensors_dropped = 0;           ///< buffers left out (see keep_buffers)
  std::uint64_t tensor_bytes = 0;            ///< total tensor bytes written
  std::vector<std::filesystem::path> files;  ///< every file written, in order
};

/// \brief Rewrites the checkpoint at `input` (directory or file) as safetensors in `out_dir`.
///
/// Writes model.safetensors, or model-0000N-of-0000M.safetensors shards plus
/// model.safetensors.index.json when the tensors exceed `max_shard_bytes`; every file is
/// written under a temporary name and renamed into place. Also copies config.json,
/// generation_config.json and the tokenizer files (ice_text.model, tokenizer.model,
/// tokenizer_config.json, special_tokens_map.json) found beside the input. Only one output
/// shard is held in memory at a time.
/// \throws qg::Error naming the file or tensor when the input cannot be read, the output
///         directory is the input directory, or writing fails.
ConvertReport convert_checkpoint(const std::filesystem::path& input,
                                 const std::filesystem::path& out_dir,
                                 const ConvertOptions& options);

/// \brief Parses "f16", "bf16", "f32" or "keep" (nullopt). \throws qg::Error otherwise.
std::optional<DType> parse_convert_dtype(std::string_view text);

/// \brief Parses a byte size: "2GB" (10^9), "2GiB" (2^30), "500MB", "64KiB", "1.5GB", "123".
/// \throws qg::Error on anything else, including zero.
std::uint64_t parse_byte_size(std::string_view text);

}  // namespace qg::io
