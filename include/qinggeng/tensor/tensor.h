// Tensor: a 2-D block of elements owned by a compute backend (host memory for the CPU
// reference, device memory for CUDA). Every tensor the model touches is a matrix: weights
// [out, in], embeddings [vocab, hidden], activations [tokens, features], vectors [1, n].
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qinggeng/tensor/dtype.h"

namespace qg {

/// \brief Where a tensor's bytes live.
enum class Device : std::uint8_t { Cpu, Cuda };

/// \brief A row-major [rows, cols] matrix whose storage is shared-owned.
///
/// Copies are shallow (they share the storage). `data()` is a host pointer for Device::Cpu
/// and a device pointer for Device::Cuda.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Device device, std::int64_t rows, std::int64_t cols,
         std::shared_ptr<void> storage, void* data)
      : dtype_(dtype), device_(device), rows_(rows), cols_(cols),
        storage_(std::move(storage)), data_(data) {}

  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  std::int64_t numel() const { return rows_ * cols_; }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  bool empty() const { return data_ == nullptr; }

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T> T* as() { return static_cast<T*>(data_); }
  template <typename T> const T* as() const { return static_cast<const T*>(data_); }

  /// \brief Rows [begin, begin + count) as a tensor sharing this one's storage.
  Tensor row_slice(std::int64_t begin, std::int64_t count) const {
    auto* base = static_cast<char*>(data_) + static_cast<std::size_t>(begin * cols_) * dtype_size(dtype_);
    return Tensor(dtype_, device_, count, cols_, storage_, base);
  }

  /// \brief "[rows, cols]" for messages.
  std::string shape_string() const {
    return "[" + std::to_string(rows_) + ", " + std::to_string(cols_) + "]";
  }

 private:
  DType dtype_ = DType::F32;
  Device device_ = Device::Cpu;
  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
};

}  // namespace qg
