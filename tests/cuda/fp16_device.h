// Test-side device memory: an RAII buffer and fp16 round trips between host float32 matrices
// (tests/backend_ops.h) and device fp16, so GPU kernels can be compared with the CPU backend.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend_ops.h"
#include "cuda/check.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::test {

/// A device array of T, freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    QG_CUDA_CHECK(cudaMalloc(&ptr_, (count ? count : 1) * sizeof(T)));
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() { return ptr_; }
  std::size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    QG_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() {
    std::vector<T> host(count_);
    QG_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// Rounds every value through fp16, so CPU and GPU start from the same inputs.
inline HostMatrix round_to_fp16(HostMatrix m) {
  for (auto& v : m.data) v = half_to_float(float_to_half(v));
  return m;
}

/// Uploads a host matrix as fp16.
inline void upload_fp16(DeviceBuffer<__half>& dst, const HostMatrix& m) {
  std::vector<__half> h(m.data.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = __float2half_rn(m.data[i]);
  dst.upload(h);
}

/// Downloads rows x cols fp16 values as a host float32 matrix.
inline HostMatrix download_fp16(DeviceBuffer<__half>& src, std::int64_t rows, std::int64_t cols) {
  const std::vector<__half> h = src.download();
  HostMatrix m{rows, cols, std::vector<float>(static_cast<std::size_t>(rows * cols))};
  for (std::size_t i = 0; i < m.data.size(); ++i) m.data[i] = __half2float(h[i]);
  return m;
}

}  // namespace qg::test
