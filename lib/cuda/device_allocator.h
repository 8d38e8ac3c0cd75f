// A caching allocator of device memory for activations and scratch buffers: blocks freed by
// the last Tensor that owns them go to a size-keyed free list and are handed out again, so a
// decode step makes no cudaMalloc/cudaFree calls. All users work on one stream, so a block
// reused by a later op is stream-ordered after the op that last used it.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace qg::cuda {

class DeviceAllocator : public std::enable_shared_from_this<DeviceAllocator> {
 public:
  DeviceAllocator() = default;
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  /// Device memory of at least `bytes`, freed into the cache when the pointer is dropped.
  /// \throws qg::Error naming `what` and the sizes when the device is out of memory.
  std::shared_ptr<void> allocate(std::size_t bytes, const char* what);
  /// Bytes currently held (in use plus cached).
  std::size_t held_bytes() const;
  /// Returns every cached (unused) block to the driver.
  void release_cached();

 private:
  void give_back(void* ptr, std::size_t bytes);
  mutable std::mutex mutex_;
  std::multimap<std::size_t, void*> cached_;
  std::size_t held_ = 0;
};

}  // namespace qg::cuda
