// OpProfiler (see op_profiler.h).
#include "cuda/op_profiler.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace qg::cuda {

OpProfiler::OpProfiler(cudaStream_t stream)
    : stream_(stream), enabled_(std::getenv("QG_CUDA_PROFILE") != nullptr) {}

OpProfiler::~OpProfiler() {
  if (!enabled_) return;
  cudaStreamSynchronize(stream_);
  collect();
  double total = 0;
  for (const auto& [name, t] : totals_) total += t.ms;
  std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  std::fprintf(stderr, "\nQG_CUDA_PROFILE: GPU time per op (%.2f ms in all)\n", total);
  std::fprintf(stderr, "| op | calls | total ms | mean us | share |\n| --- | --- | --- | --- | --- |\n");
  for (const auto& [name, t] : rows) {
    std::fprintf(stderr, "| %s | %lld | %.3f | %.1f | %.1f%% |\n", name.c_str(), t.calls, t.ms,
                 1e3 * t.ms / static_cast<double>(t.calls), total > 0 ? 100 * t.ms / total : 0.0);
  }
  for (auto e : free_events_) cudaEventDestroy(e);
}

cudaEvent_t OpProfiler::take_event() {
  if (free_events_.empty()) {
    cudaEvent_t e;
    cudaEventCreate(&e);
    return e;
  }
  cudaEvent_t e = free_events_.back();
  free_events_.pop_back();
  return e;
}

OpProfiler::Scope::Scope(OpProfiler* profiler, std::string name)
    : profiler_(profiler), name_(std::move(name)) {
  if (!profiler_) return;
  start_ = profiler_->take_event();
  cudaEventRecord(start_, profiler_->stream_);
}

OpProfiler::Scope::~Scope() {
  if (!profiler_) return;
  cudaEvent_t stop = profiler_->take_event();
  cudaEventRecord(stop, profiler_->stream_);
  profiler_->pending_.push_back({std::move(name_), start_, stop});
}

void OpProfiler::collect() {
  if (!enabled_) return;
  for (auto& p : pending_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, p.start, p.stop) == cudaSuccess) {
      auto& t = totals_[p.name];
      ++t.calls;
      t.ms += ms;
    }
    free_events_.push_back(p.start);
    free_events_.push_back(p.stop);
  }
  pending_.clear();
}

}  // namespace qg::cuda
