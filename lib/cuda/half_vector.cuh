// HalfVec: kVec fp16 values moved as one aligned access (kVec = 8: one 16-byte load/store),
// the unit of the memory-bound fp16 kernels (layer_norm.cu, elementwise.cu, the rotary append).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace qg::cuda {

template <int kVec>
struct alignas(kVec * 2) HalfVec {
  __half v[kVec];
};

/// True when `p` allows 16-byte vector access.
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace qg::cuda
