// Writing safetensors checkpoints (https://github.com/huggingface/safetensors): one file, or a
// directory of shards plus model.safetensors.index.json as Hugging Face publishes them.
// Reading goes through WeightStore (weight_store.h). Files are written under a temporary name
// and renamed into place, so a reader never sees a partial file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "qinggeng/tensor/dtype.h"

namespace qg::io {

/// \brief One tensor to write: contiguous, row-major, little-endian bytes at `data`.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  ///< empty for a 0-d scalar
  const void* data = nullptr;       ///< numel * dtype_size(dtype) bytes (may be null if 0)
};

/// \brief Writes `tensors` to one safetensors file, atomically.
///
/// Layout matches the reference writer: an 8-byte little-endian header length, a compact JSON
/// header (`__metadata__` first when non-empty) padded with spaces to a multiple of 8 bytes,
/// then the tensor data sorted by descending dtype (8-byte types first, so every tensor stays
/// aligned to its element size) and then by name.
/// \throws qg::Error naming the file or tensor (duplicate or empty name, negative dimension,
///         null data, write failure).
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// \brief One output file of a sharded checkpoint.
struct SafetensorsShard {
  std::string file;                  ///< "model-00001-of-00003.safetensors" or "model.safetensors"
  std::vector<std::size_t> tensors;  ///< indices into the planned tensor list, in order
  std::uint64_t nbytes = 0;          ///< tensor bytes in this shard
};

/// \brief Splits tensors of the given byte sizes into shards of at most `max_shard_bytes`.
///
/// Tensors stay in the given order; a new shard starts when the next tensor would overflow the
/// current one, and a tensor larger than the limit gets a shard of its own. A single shard is
/// named model.safetensors, several model-0000N-of-0000M.safetensors.
/// \throws qg::Error when max_shard_bytes is 0.
std::vector<SafetensorsShard> plan_safetensors_shards(
    const std::vector<std::uint64_t>& tensor_bytes, std::uint64_t max_shard_bytes);

/// \brief Finishes a sharded output in `dir` after its shard files are written.
///
/// With several shards writes model.safetensors.index.json (`{"metadata": {"total_size": N},
/// "weight_map": {name: file}}`, `names[i]` naming planned tensor i) and removes a stale
/// model.safetensors; with one shard removes a stale index, so the directory always opens as
/// the checkpoint just written.
void write_safetensors_index(const std::filesystem::path& dir,
                             const std::vector<SafetensorsShard>& shards,
                             const std::vector<std::string>& names);

/// \brief Writes `tensors` into directory `dir` (created if needed) as shards of at most
/// `max_shard_bytes` tensor bytes plus an index, or as model.safetensors when they fit one
/// shard. `metadata` goes into every shard's header.
/// \return the files written, shards first, then the index if any.
std::vector<std::filesystem::path> write_safetensors_sharded(
    const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
    std::uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata = {});

}  // namespace qg::io
