// Programmatic dependent launch (PDL, sm_90+): the next kernel in the stream is scheduled
// while the previous one drains, runs its prologue, and waits for the previous kernel's
// results only where it needs them. Between short kernels (a decode step has ~250, a training
// step ~900) each boundary otherwise costs a launch and a pipeline ramp of a few microseconds.
//
// The contract, for every kernel launched with launch_chained:
//   - every thread calls chain_wait() before it touches memory that another kernel may write
//     or read (activations, caches, workspaces, and weights too: a dequantized or just
//     updated weight is written by an earlier kernel) and before it can exit, so that this
//     kernel's completion implies the completion of everything before it in the stream;
//   - before chain_wait() it may only prefetch into L2 (prefetch.global.L2 or a TMA L2
//     prefetch): L2 is where all writes land, so a prefetch never yields stale data;
//   - it may call chain_release() anywhere (here: first thing); the next chained kernel is
//     scheduled once every block of this one has called it or exited.
// A kernel launched the ordinary way after a chained one waits for it, as stream order says.
//
// Chained launches are off by default: QG_CUDA_PDL=1 in the environment (read once) or
// set_chained_launch(true) turns them on, and they only ever run on sm_90 or newer; otherwise
// launch_chained is an ordinary launch, and chain_wait / chain_release are no-ops (a kernel
// launched the ordinary way has no prerequisite grid still running). Both device calls
// compile to nothing below sm_90. The host part also builds in plain C++ translation units
// (chained_launch.cu defines the switch).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda/check.h"

namespace qg::cuda {

#ifdef __CUDACC__
/// \brief Waits until the previous kernel of the stream has completed and its writes are
/// visible (griddepcontrol.wait); immediate without a chained launch.
__device__ __forceinline__ void chain_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/// \brief Lets the next chained kernel of the stream start early
/// (griddepcontrol.launch_dependents).
__device__ __forceinline__ void chain_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#endif  // __CUDACC__

/// \brief Whether launch_chained overlaps kernels on the current device: switched on
/// (QG_CUDA_PDL=1 or set_chained_launch), an sm_90 or newer device, and this build's code
/// for it compiled for sm_90 or newer (cached per device).
bool chained_launch_enabled();

/// \brief Switches chained launches on or off for the whole process from the next launch on
/// (tests compare both; benchmarks time both) and returns whether they were switched on
/// before. CUDA graphs keep what they captured.
bool set_chained_launch(bool on);

/// \brief Launches kernel<<<grid, block, shared_bytes, stream>>>(args...) as a programmatic
/// dependent of the stream's previous kernel where chained_launch_enabled(); see the contract
/// above. Throws qg::Error on a failed launch.
template <typename... Params, typename... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
                    cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (chained_launch_enabled()) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  QG_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace qg::cuda
