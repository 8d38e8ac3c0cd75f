// CUDA device discovery (see include/qinggeng/cuda/device.h).
#include "qinggeng/cuda/device.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"

namespace qg::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" error
    return 0;
  }
  return count;
}

std::string device_description(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return "CUDA device " + std::to_string(device) + " (unavailable)";
  }
  char buf[1024];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor,
                p.multiProcessorCount, static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024 * 1024));
  return buf;
}

namespace {

/// The chained-launch switch: -1 until first read (then QG_CUDA_PDL decides), else 0 / 1.
std::atomic<int> chained_launch_switch{-1};

}  // namespace

void set_chained_launch(bool on) { chained_launch_switch.store(on ? 1 : 0); }

bool chained_launch_enabled() {
  int on = chained_launch_switch.load();
  if (on < 0) {
    const char* env = std::getenv("QG_CUDA_PDL");
    int expected = -1;
    chained_launch_switch.compare_exchange_strong(
        expected, env != nullptr && std::strcmp(env, "1") == 0 ? 1 : 0);
    on = chained_launch_switch.load();
  }
  if (on == 0) return false;
  static thread_local int cached_device = -1;
  static thread_local bool capable = false;
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  if (device != cached_device) {
    int major = 0;
    QG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    capable = major >= 9;
    cached_device = device;
  }
  return capable;
}

}  // namespace qg::cuda
