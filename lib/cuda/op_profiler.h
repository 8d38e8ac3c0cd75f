// OpProfiler: per-op GPU time of the CUDA backend, for finding where a forward pass spends
// its time without an external profiler. Enabled by the environment variable QG_CUDA_PROFILE
// (any value); then every backend op records a pair of CUDA events, the times are collected at
// each host synchronisation, and a table (op, calls, total ms, mean us, share) is printed to
// stderr when the backend is destroyed. Disabled, a scope costs one branch.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <string>
#include <vector>

namespace qg::cuda {

class OpProfiler {
 public:
  explicit OpProfiler(cudaStream_t stream);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  bool enabled() const { return enabled_; }

  /// Times the ops launched on the stream during its lifetime under `name`.
  class Scope {
   public:
    Scope(OpProfiler* profiler, std::string name);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* profiler_;
    std::string name_;
    cudaEvent_t start_ = nullptr;
  };
  Scope scope(const char* name) { return Scope(enabled_ ? this : nullptr, name); }
  Scope scope(std::string name) { return Scope(enabled_ ? this : nullptr, std::move(name)); }

  /// Reads the finished event pairs into the totals (call after a stream synchronisation).
  void collect();

 private:
  struct Pending {
    std::string name;
    cudaEvent_t start, stop;
  };
  struct Total {
    long long calls = 0;
    double ms = 0;
  };
  cudaEvent_t take_event();

  cudaStream_t stream_;
  bool enabled_ = false;
  std::vector<cudaEvent_t> free_events_;
  std::vector<Pending> pending_;
  std::map<std::string, Total> totals_;
};

}  // namespace qg::cuda
