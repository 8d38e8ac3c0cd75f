// The 2-D rotary's arithmetic on the GPU, shared by the training kernels that rotate q and k:
// glm_rotary_qkv (rotary_train.cu) and the attention backward that hands dq and dk back
// inverse-rotated (attention_train_backward.cu), so that both give the same bits. Within each
// half of a head, x1 at j and x2 at j + head_dim / 4 turn by the angle pos * inv_freq[j], the
// first half by the row's position, the second by its block position (model/rotary.h).
#pragma once

#include <cuda_fp16.h>

namespace qg::cuda {

/// \brief The frequency table of one head_dim (head_dim / 4 entries, up to head_dim 128),
/// passed to kernels by value.
struct RotaryFreqs {
  static constexpr int kMaxQuarter = 32;
  float inv_freq[kMaxQuarter];
};

/// \brief model::glm_rotary_inv_freq(head_dim / 2) as a kernel argument.
/// \throws qg::Error unless head_dim is a multiple of 4 up to 128.
RotaryFreqs rotary_freqs(int head_dim);

#ifdef __CUDACC__
/// \brief cos and sign * sin of the angle pos * inv_freq (sign -1: the inverse rotation).
__device__ __forceinline__ void rotary_cos_sin(int pos, float inv_freq, float sign, float& c,
                                               float& s) {
  sincosf(__fmul_rn(static_cast<float>(pos), inv_freq), &s, &c);
  s *= sign;
}

/// \brief (x1, x2) turned by the angle whose cos and sin are c and s, rounded to fp16. Every
/// product and sum is rounded on its own (no FMA contraction, which the compiler may choose
/// differently per call site), so the kernels sharing this give the same bits.
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, __half& y1,
                                            __half& y2) {
  y1 = __float2half_rn(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
  y2 = __float2half_rn(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}
#endif  // __CUDACC__

}  // namespace qg::cuda
