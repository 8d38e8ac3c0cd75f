// CUDA device discovery (see include/qinggeng/cuda/device.h).
#include "qinggeng/cuda/device.h"

#include <cuda_runtime.h>

#include <cstdio>

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

}  // namespace qg::cuda
