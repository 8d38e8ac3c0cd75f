// f32 <-> f16 conversion kernels (see include/qinggeng/cuda/convert.h). Grid-stride loops;
// __float2half_rn is round-to-nearest-even like the host converter.
#include <cuda_fp16.h>

#include "cuda/check.h"
#include "qinggeng/cuda/convert.h"

namespace qg::cuda {
namespace {

// ---- CUDA kernels ----
__global__ void f32_to_f16_kernel(const float* src, __half* dst, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    dst[i] = __float2half_rn(src[i]);
  }
}

__global__ void f16_to_f32_kernel(const __half* src, float* dst, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    dst[i] = __half2float(src[i]);
  }
}

unsigned grid_for(std::size_t n) {
  const std::size_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks == 0 ? 1 : blocks) : 65535);
}

}  // namespace

// ---- kernel launchers ----
void f32_to_f16(const float* src, std::uint16_t* dst, std::size_t n, cudaStream_t stream) {
  f32_to_f16_kernel<<<grid_for(n), 256, 0, stream>>>(src, reinterpret_cast<__half*>(dst), n);
  QG_CUDA_CHECK(cudaGetLastError());
}

void f16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, cudaStream_t stream) {
  f16_to_f32_kernel<<<grid_for(n), 256, 0, stream>>>(reinterpret_cast<const __half*>(src), dst, n);
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
