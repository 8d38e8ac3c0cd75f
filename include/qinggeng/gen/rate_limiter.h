// Requests-per-minute and tokens-per-minute limits for an API, as two token buckets.
#pragma once

#include <mutex>

#include "qinggeng/gen/cancellation.h"

namespace qg::gen {

/// \brief Two token buckets (requests, tokens) refilled continuously at rate/60 per second.
///
/// Each bucket holds at most one minute's allowance, so a fresh limiter allows a burst of up to
/// that much. A request reserves its estimated tokens up front; settle() corrects the token
/// bucket once the real usage is known (it may go negative, delaying later requests). A limit
/// of 0 disables that bucket. Thread-safe.
class RateLimiter {
 public:
  /// \brief A limiter allowing `requests_per_minute` and `tokens_per_minute` (0 = unlimited).
  RateLimiter(double requests_per_minute, double tokens_per_minute);

  /// \brief Non-blocking: at time `now` (seconds, any fixed origin), takes one request and
  /// `tokens` if both buckets allow it and returns 0; otherwise takes nothing and returns the
  /// seconds to wait before trying again.
  double try_acquire(double now, double tokens);

  /// \brief Blocks until try_acquire succeeds (steady clock); false if `cancel` stopped it.
  bool acquire(double tokens, const Cancellation& cancel);

  /// \brief Adjusts the token bucket by `reserved - actual` once a request's usage is known.
  void settle(double reserved, double actual);

  /// \brief Seconds on the steady clock used by acquire().
  static double steady_now();

 private:
  struct Bucket {
    double rate_per_s = 0;  // 0: unlimited
    double capacity = 0;
    double level = 0;
    void refill(double dt);
  };
  std::mutex mutex_;
  Bucket requests_;
  Bucket tokens_;
  double last_ = -1;
};

}  // namespace qg::gen
