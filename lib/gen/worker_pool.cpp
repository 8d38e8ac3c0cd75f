// Worker threads and cooperative cancellation (see worker_pool.h, cancellation.h).
#include "qinggeng/gen/worker_pool.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "qinggeng/error.h"

namespace qg::gen {

bool Cancellation::sleep_for(double seconds) const {
  // Polling keeps request() async-signal-safe (no condition variable to notify).
  using clock = std::chrono::steady_clock;
  auto until = clock::now() + std::chrono::duration_cast<clock::duration>(
                                  std::chrono::duration<double>(std::max(seconds, 0.0)));
  while (!requested()) {
    auto now = clock::now();
    if (now >= until) return true;
    clock::duration slice = std::chrono::milliseconds(20);
    std::this_thread::sleep_for(std::min(slice, until - now));
  }
  return false;
}

void run_workers(int workers, const std::function<void(int)>& body, Cancellation& cancel) {
  QG_CHECK(workers >= 1, "workers must be at least 1 (got ", workers, ")");
  std::mutex mutex;
  std::exception_ptr first;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      try {
        body(w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!first) first = std::current_exception();
        cancel.request();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace qg::gen
