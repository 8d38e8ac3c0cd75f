// A small fixed pool of worker threads for the CPU reference backend's data-parallel loops.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qg::cpu {

/// Runs `fn(begin, end)` over disjoint sub-ranges of [0, n) on the pool and the caller.
class ThreadPool {
 public:
  explicit ThreadPool(int threads);  ///< total threads including the caller; 0 = hardware
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  /// Splits [0, n) into about size() pieces of at least `min_chunk` items; blocks until done.
  void parallel_for(std::int64_t n, std::int64_t min_chunk,
                    const std::function<void(std::int64_t, std::int64_t)>& fn);

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t, std::int64_t)>* job_ = nullptr;
  std::int64_t job_n_ = 0, job_chunk_ = 0;
  std::uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

}  // namespace qg::cpu
