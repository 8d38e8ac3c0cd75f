// Test-side device memory: an RAII buffer and fp16 round trips between host float32 matrices
// (tests/backend_ops.h) and device fp16, so GPU kernels can be compared with the CPU backend.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
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
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), count_(other.count_) {
    other.ptr_ = nullptr;
  }
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

/// A random host matrix rounded through fp16.
inline HostMatrix random_fp16(std::int64_t rows, std::int64_t cols, std::uint32_t seed,
                              float scale = 1.0f, float mean = 0.0f) {
  return round_to_fp16(random_matrix(rows, cols, seed, scale, mean));
}

/// A host matrix on the device as fp16.
struct DeviceMatrix {
  explicit DeviceMatrix(const HostMatrix& m)
      : rows(m.rows), cols(m.cols), buf(static_cast<std::size_t>(m.rows * m.cols)) {
    upload_fp16(buf, m);
  }
  DeviceMatrix(std::int64_t r, std::int64_t c)
      : rows(r), cols(c), buf(static_cast<std::size_t>(r * c)) {}
  HostMatrix host() { return download_fp16(buf, rows, cols); }
  std::int64_t rows, cols;
  DeviceBuffer<__half> buf;
};

/// ||a - b|| / ||b|| (0 when both vanish): the tolerance measure of gradients.
inline double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 1e-30;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(num / den) : 1e30;
}

}  // namespace qg::test
