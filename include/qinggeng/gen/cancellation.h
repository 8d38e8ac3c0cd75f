// Cooperative stop signal shared by the workers, the HTTP client and the apps' Ctrl-C handler.
#pragma once

#include <atomic>

namespace qg::gen {

/// \brief A flag that, once raised, asks every worker and in-flight request to stop.
///
/// request() only stores to a lock-free atomic, so a signal handler may call it.
class Cancellation {
 public:
  /// \brief Raises the flag.
  void request() noexcept { flag_.store(true, std::memory_order_relaxed); }
  /// \brief True once request() has been called.
  bool requested() const noexcept { return flag_.load(std::memory_order_relaxed); }
  /// \brief Sleeps up to `seconds`, returning early (false) if the flag is raised meanwhile.
  bool sleep_for(double seconds) const;

 private:
  std::atomic<bool> flag_{false};
};

}  // namespace qg::gen
