// How generator workers treat a request that failed: transient failures are counted and
// skipped until too many happen in a row; anything else ends the run.
#pragma once

#include <atomic>
#include <optional>

#include "qinggeng/gen/chat_client.h"
#include "qinggeng/gen/progress.h"

namespace qg::gen {

class ErrorBudget {
 public:
  ErrorBudget(GenStats& stats, int max_consecutive) : stats_(stats), max_(max_consecutive) {}

  /// The reply, or nullopt when the request was cancelled or failed transiently (counted in
  /// stats.errors). Rethrows fatal ApiErrors, and the transient one that makes
  /// `max_consecutive` failures in a row.
  std::optional<ChatResult> complete(ChatClient& client, const ChatRequest& request);

 private:
  GenStats& stats_;
  int max_;
  std::atomic<int> consecutive_{0};
};

}  // namespace qg::gen
