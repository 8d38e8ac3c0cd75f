// Token-bucket request/token limiter (see rate_limiter.h).
#include "qinggeng/gen/rate_limiter.h"

#include <algorithm>
#include <chrono>

#include "qinggeng/error.h"

namespace qg::gen {

void RateLimiter::Bucket::refill(double dt) {
  if (rate_per_s > 0) level = std::min(capacity, level + dt * rate_per_s);
}

RateLimiter::RateLimiter(double requests_per_minute, double tokens_per_minute) {
  QG_CHECK(requests_per_minute >= 0 && tokens_per_minute >= 0,
           "rate limits must not be negative (requests/min ", requests_per_minute,
           ", tokens/min ", tokens_per_minute, ")");
  requests_ = {requests_per_minute / 60.0, requests_per_minute, requests_per_minute};
  tokens_ = {tokens_per_minute / 60.0, tokens_per_minute, tokens_per_minute};
}

double RateLimiter::try_acquire(double now, double tokens) {
  std::lock_guard<std::mutex> lock(mutex_);
  double dt = last_ < 0 ? 0 : std::max(0.0, now - last_);
  last_ = std::max(last_, now);
  requests_.refill(dt);
  tokens_.refill(dt);
  // A request larger than a whole minute's allowance could never fit; let it through once the
  // bucket is full instead of waiting forever.
  double need_tokens = std::min(tokens, tokens_.capacity);
  double wait = 0;
  if (requests_.rate_per_s > 0 && requests_.level < 1.0) {
    wait = std::max(wait, (1.0 - requests_.level) / requests_.rate_per_s);
  }
  if (tokens_.rate_per_s > 0 && tokens_.level < need_tokens) {
    wait = std::max(wait, (need_tokens - tokens_.level) / tokens_.rate_per_s);
  }
  if (wait > 0) return wait;
  if (requests_.rate_per_s > 0) requests_.level -= 1.0;
  if (tokens_.rate_per_s > 0) tokens_.level -= tokens;
  return 0;
}

bool RateLimiter::acquire(double tokens, const Cancellation& cancel) {
  for (;;) {
    if (cancel.requested()) return false;
    double wait = try_acquire(steady_now(), tokens);
    if (wait <= 0) return true;
    if (!cancel.sleep_for(wait)) return false;
  }
}

void RateLimiter::settle(double reserved, double actual) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (tokens_.rate_per_s > 0) {
    tokens_.level = std::min(tokens_.capacity, tokens_.level + reserved - actual);
  }
}

double RateLimiter::steady_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace qg::gen
