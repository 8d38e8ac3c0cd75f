// Counters a generator updates while it runs, and the progress line / usage summary the apps
// print from them.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>

#include "qinggeng/gen/chat_client.h"

namespace qg::gen {

/// \brief Live counters of a generation run (updated by workers, read by the progress line).
struct GenStats {
  std::atomic<std::int64_t> target{0};    ///< records wanted (0: no fixed target)
  std::atomic<std::int64_t> done{0};      ///< records in the output, including resumed ones
  std::atomic<std::int64_t> resumed{0};   ///< records found in the output at start
  std::atomic<std::int64_t> rejected{0};  ///< candidates dropped by a filter or dedup
  std::atomic<std::int64_t> errors{0};    ///< requests that failed after all retries
};

/// \brief One progress line: done/target, rate, ETA, tokens, cost, rejected, errors.
std::string progress_line(const GenStats& stats, const UsageTotals& usage, double elapsed_s);

/// \brief A multi-line summary of requests, retries, tokens and estimated cost.
std::string usage_summary(const UsageTotals& usage);

/// \brief Rewrites a progress line on `out` (carriage return, no newline) every `interval_s`
/// from a background thread until destroyed; then prints the final line and a newline.
class ProgressReporter {
 public:
  ProgressReporter(const GenStats& stats, const ChatClient& client, std::FILE* out,
                   double interval_s = 0.5);
  ~ProgressReporter();
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

 private:
  void print() const;
  const GenStats& stats_;
  const ChatClient& client_;
  std::FILE* out_;
  double start_;
  Cancellation stop_;
  std::thread thread_;
};

}  // namespace qg::gen
