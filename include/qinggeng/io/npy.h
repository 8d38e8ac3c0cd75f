// NumPy .npy files of float32 arrays: golden outputs made by the PyTorch reference are stored
// this way, and tools dump activations in the same format for inspection with numpy.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace qg::io {

/// \brief A float32 array read from a .npy file (C order).
struct NpyArray {
  std::vector<std::int64_t> shape;  ///< empty for a 0-d array
  std::vector<float> data;          ///< product(shape) values, row-major
};

/// \brief Writes `data` with `shape` as a NumPy v1.0 file ('<f4', C order), atomically.
///
/// The header is padded with spaces and a final newline so the data starts at a multiple of
/// 64 bytes, as numpy itself writes it.
/// \throws qg::Error naming the file on a negative dimension or a write failure.
void write_npy_f32(const std::filesystem::path& path, const float* data,
                   const std::vector<std::int64_t>& shape);

/// \brief Reads a little-endian float32 .npy file (format version 1.0, 2.0 or 3.0).
/// \throws qg::Error naming the file when it is missing, not .npy, of another dtype, in
///         Fortran order, or truncated.
NpyArray read_npy_f32(const std::filesystem::path& path);

}  // namespace qg::io
