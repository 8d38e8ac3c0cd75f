// Parsers of the checkpoint file formats that WeightStore reads: safetensors and PyTorch's
// torch.save zip archives. Each turns the bytes of one (mapped) file into tensor views that
// point into those bytes. Internal.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "qinggeng/io/weight_store.h"

namespace qg::io {

/// Tensors of one checkpoint file. Views point into the file mapping or into `owned`.
struct ParsedCheckpoint {
  std::vector<TensorView> tensors;              ///< in the order the file lists them
  std::map<std::string, std::string> metadata;  ///< safetensors `__metadata__`
  std::vector<std::vector<std::byte>> owned;    ///< contiguous copies of strided tensors
};

/// Validates and indexes the safetensors file held in [data, data + size) (header bounds,
/// dtypes, shapes, data offsets); `name` is the file name for TensorView::source and errors.
/// Throws qg::Error naming the file and tensor on any inconsistency.
ParsedCheckpoint parse_safetensors(const std::byte* data, std::size_t size,
                                   const std::string& name);

/// Reads the torch.save zip archive held in [data, data + size): a state dict, optionally
/// nested one level under "state_dict" or "model". Throws qg::Error naming the file and entry
/// on any inconsistency.
ParsedCheckpoint parse_torch_checkpoint(const std::byte* data, std::size_t size,
                                        const std::string& name);

/// True when the bytes start like a torch.save file (a ZIP archive, or the bare pickle of the
/// pre-1.6 format, which parse_torch_checkpoint reports as unsupported).
bool looks_like_torch_checkpoint(const std::byte* data, std::size_t size);

/// Product of `shape` as an element count; throws qg::Error naming `context` on a negative
/// dimension or overflow.
std::size_t checked_numel(const std::vector<std::int64_t>& shape, const std::string& context);

}  // namespace qg::io
