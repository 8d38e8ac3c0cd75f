// The chained-launch switch (lib/cuda/chained_launch.cuh).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"

namespace qg::cuda {
namespace {

/// -1 until first read (then QG_CUDA_PDL decides), else 0 / 1.
std::atomic<int> chained_launch_switch{-1};

/// Compiled like every chained kernel: its PTX version says whether this build's code for the
/// current device has the griddepcontrol instructions (sm_90 or newer PTX).
__global__ void chained_launch_probe_kernel() { chain_wait(); }

}  // namespace

bool set_chained_launch(bool on) {
  const bool before = chained_launch_switch.exchange(on ? 1 : 0) == 1;
  return before;
}

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
    // The device must run PDL (sm_90+) and this build's code for it must contain the waits: a
    // build without 90 in its architectures runs older PTX on Hopper, where chain_wait is
    // empty, and a chained launch without the wait would race.
    int major = 0;
    QG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cudaFuncAttributes probe{};
    QG_CUDA_CHECK(cudaFuncGetAttributes(&probe, chained_launch_probe_kernel));
    capable = major >= 9 && probe.ptxVersion >= 90;
    cached_device = device;
  }
  return capable;
}

}  // namespace qg::cuda
