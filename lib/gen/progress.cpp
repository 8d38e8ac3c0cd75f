// Progress line and usage summary of the generation apps (see progress.h).
#include "qinggeng/gen/progress.h"

#include <cstdio>

#include "qinggeng/gen/rate_limiter.h"

namespace qg::gen {

namespace {
std::string duration(double s) {
  if (s < 0 || s > 1e7) return "--:--:--";
  auto t = static_cast<long>(s + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%02ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  return buf;
}
}  // namespace

std::string progress_line(const GenStats& stats, const UsageTotals& usage, double elapsed_s) {
  std::int64_t done = stats.done, target = stats.target, fresh = done - stats.resumed;
  double rate = elapsed_s > 0 ? static_cast<double>(fresh) / elapsed_s * 60.0 : 0.0;
  double eta = target > done && rate > 0 ? static_cast<double>(target - done) / rate * 60.0 : -1;
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%lld/%s | %.1f/min | elapsed %s | ETA %s | tokens %lld+%lld | cost %.4f | "
                "rejected %lld | errors %lld | retries %lld",
                static_cast<long long>(done),
                target > 0 ? std::to_string(target).c_str() : "-", rate,
                duration(elapsed_s).c_str(), duration(eta).c_str(),
                static_cast<long long>(usage.prompt_tokens),
                static_cast<long long>(usage.completion_tokens), usage.cost,
                static_cast<long long>(stats.rejected.load()),
                static_cast<long long>(stats.errors.load()),
                static_cast<long long>(usage.retries));
  return buf;
}

std::string usage_summary(const UsageTotals& u) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "requests: %lld ok, %lld failed, %lld attempts (%lld retries)\n"
                "tokens:   %lld prompt + %lld completion = %lld\n"
                "cost:     %.4f (estimated from the per-1k-token prices)\n",
                static_cast<long long>(u.requests), static_cast<long long>(u.failures),
                static_cast<long long>(u.attempts), static_cast<long long>(u.retries),
                static_cast<long long>(u.prompt_tokens),
                static_cast<long long>(u.completion_tokens),
                static_cast<long long>(u.prompt_tokens + u.completion_tokens), u.cost);
  return buf;
}

ProgressReporter::ProgressReporter(const GenStats& stats, const ChatClient& client,
                                   std::FILE* out, double interval_s)
    : stats_(stats), client_(client), out_(out), start_(RateLimiter::steady_now()) {
  thread_ = std::thread([this, interval_s] {
    while (stop_.sleep_for(interval_s)) print();
  });
}

ProgressReporter::~ProgressReporter() {
  stop_.request();
  thread_.join();
  print();
  std::fputc('\n', out_);
  std::fflush(out_);
}

void ProgressReporter::print() const {
  std::string line = progress_line(stats_, client_.usage(), RateLimiter::steady_now() - start_);
  std::fprintf(out_, "\r%s\033[K", line.c_str());
  std::fflush(out_);
}

}  // namespace qg::gen
