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

/// Per device: 0 not asked yet, 1 chained launches cannot run there, 2 they can.
constexpr int kCachedDevices = 64;
std::atomic<int> capable_device[kCachedDevices] = {};

/// Compiled like every chained kernel: its PTX version says whether this build's code for the
/// current device has the griddepcontrol instructions (sm_90 or newer PTX).
__global__ void chained_launch_probe_kernel() { chain_wait(); }

/// The switch, with QG_CUDA_PDL read on first use.
bool switched_on() {
  int on = chained_launch_switch.load();
  if (on < 0) {
    const char* env = std::getenv("QG_CUDA_PDL");
    int expected = -1;
    chained_launch_switch.compare_exchange_strong(
        expected, env != nullptr && std::strcmp(env, "1") == 0 ? 1 : 0);
    on = chained_launch_switch.load();
  }
  return on == 1;
}

}  // namespace

bool set_chained_launch(bool on) {
  const bool before = switched_on();
  chained_launch_switch.store(on ? 1 : 0);
  return before;
}

bool chained_launch_enabled() {
  if (!switched_on()) return false;
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int known = capable_device[device].load();
    if (known != 0) return known == 2;
  }
  // The device must run PDL (sm_90+) and this build's code for it must contain the waits: a
  // build without 90 in its architectures runs older PTX on Hopper, where chain_wait is
  // empty, and a chained launch without the wait would race. Asked once per device and
  // process, so a CUDA graph capture (after the op-by-op first step) makes no such call.
  int major = 0;
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes probe{};
  QG_CUDA_CHECK(cudaFuncGetAttributes(&probe, chained_launch_probe_kernel));
  const bool capable = major >= 9 && probe.ptxVersion >= 90;
  if (cacheable) capable_device[device].store(capable ? 2 : 1);
  return capable;
}

}  // namespace qg::cuda
