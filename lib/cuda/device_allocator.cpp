// DeviceAllocator (see device_allocator.h). Sizes are rounded up so similar requests share
// blocks: to 256 bytes below 1 MiB, to 1 MiB above.
#include "cuda/device_allocator.h"

#include <cuda_runtime.h>

#include "cuda/check.h"

namespace qg::cuda {
namespace {
std::size_t round_size(std::size_t bytes) {
  const std::size_t unit = bytes < (1u << 20) ? 256 : (1u << 20);
  return (bytes + unit - 1) / unit * unit;
}
}  // namespace

DeviceAllocator::~DeviceAllocator() { release_cached(); }

std::shared_ptr<void> DeviceAllocator::allocate(std::size_t bytes, const char* what) {
  const std::size_t size = round_size(bytes == 0 ? 1 : bytes);
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cached_.lower_bound(size);
    if (it != cached_.end() && it->first == size) {
      ptr = it->second;
      cached_.erase(it);
    }
  }
  if (!ptr) {
    if (cudaMalloc(&ptr, size) != cudaSuccess) {
      cudaGetLastError();
      release_cached();  // retry once with the cache emptied
      if (cudaMalloc(&ptr, size) != cudaSuccess) {
        cudaGetLastError();
        std::size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        fail("out of GPU memory allocating ", what, ": ", size, " bytes asked, ", free_bytes,
             " of ", total, " bytes free");
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    held_ += size;
  }
  auto self = shared_from_this();
  return std::shared_ptr<void>(ptr, [self, size](void* p) { self->give_back(p, size); });
}

void DeviceAllocator::give_back(void* ptr, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  cached_.emplace(bytes, ptr);
}

std::size_t DeviceAllocator::held_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return held_;
}

void DeviceAllocator::release_cached() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [size, ptr] : cached_) {
    cudaFree(ptr);
    held_ -= size;
  }
  cached_.clear();
}

}  // namespace qg::cuda
