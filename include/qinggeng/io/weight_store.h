// WeightStore: every tensor of a Hugging Face model directory, by name, without copying.
//
// Reads the checkpoint layouts THUDM/chatglm-6b and its descendants publish:
//   - model.safetensors, or shards listed in model.safetensors.index.json
//   - pytorch_model.bin, or shards listed in pytorch_model.bin.index.json (PyTorch zip+pickle)
// Files are memory-mapped; a TensorView points into the mapping (a non-contiguous PyTorch
// tensor is the one case that is copied, once, into a contiguous buffer the store owns).
// Every error (missing file, truncated data, bad header, unknown dtype, missing tensor, wrong
// shape) is a qg::Error naming the file and the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/tensor/dtype.h"

namespace qg::io {

/// \brief A read-only view of one stored tensor: contiguous, row-major, little-endian.
struct TensorView {
  std::string name;                  ///< tensor name as stored ("transformer.layers.0....")
  DType dtype = DType::F32;          ///< stored element type
  std::vector<std::int64_t> shape;   ///< dimensions; empty for a 0-d scalar
  const std::byte* data = nullptr;   ///< first element (valid while the store lives)
  std::size_t nbytes = 0;            ///< numel() * dtype_size(dtype)
  std::string source;                ///< file the tensor came from (for messages)

  /// \brief Number of elements (1 for a scalar).
  std::int64_t numel() const;
  /// \brief "[4096, 16384]" style rendering of the shape, for messages.
  std::string shape_string() const;
};

/// \brief All tensors of one checkpoint (one file or a sharded directory), memory-mapped.
class WeightStore {
 public:
  /// \brief Opens a model directory or a single .safetensors / .bin file.
  ///
  /// In a directory the first present of model.safetensors.index.json, model.safetensors,
  /// pytorch_model.bin.index.json, pytorch_model.bin is used.
  /// \throws qg::Error naming the path when nothing loadable is found or a file is corrupt.
  static WeightStore open(const std::filesystem::path& path);

  WeightStore(WeightStore&&) noexcept;
  WeightStore& operator=(WeightStore&&) noexcept;
  ~WeightStore();

  /// \brief True when a tensor of this name is stored.
  bool contains(std::string_view name) const;
  /// \brief The tensor `name`. \throws qg::Error naming the tensor and checkpoint if absent.
  const TensorView& get(std::string_view name) const;
  /// \brief The tensor `name`, checked to have exactly `shape`.
  /// \throws qg::Error naming the tensor, its file, the expected and the stored shape.
  const TensorView& get(std::string_view name, const std::vector<std::int64_t>& shape) const;
  /// \brief The tensor converted to float32 (any floating dtype), shape-checked.
  std::vector<float> read_f32(std::string_view name, const std::vector<std::int64_t>& shape) const;
  /// \brief All tensor names, sorted.
  std::vector<std::string> names() const;
  /// \brief The directory or file this store was opened from.
  const std::filesystem::path& path() const;

 private:
  struct Impl;
  explicit WeightStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::io
