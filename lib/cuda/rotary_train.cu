// glm_rotary_qkv (include/qinggeng/cuda/attention_train.h): the 2-D rotary of a training step,
// in place on the q and k slices of fused qkv rows, forward or inverse (the backward of the
// rotation is the rotation by the negated angles). One block per 4 rows; each thread rotates 8
// consecutive (x1, x2) pairs of one half of one head (two 16-byte accesses; one pair where
// head_dim is not a multiple of 32), for q and k, after the row's angles are tabulated in
// shared memory. The frequencies are model/rotary.h's (the fp16-rounded table of the release),
// the same the inference append kernel and the CPU reference use.
#include <cstdint>
#include <vector>

#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/glm_rotary.cuh"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"
#include "qinggeng/model/rotary.h"

namespace qg::cuda {
namespace {

constexpr int kMaxQuarter = RotaryFreqs::kMaxQuarter;  // head_dim / 4 for head_dim <= 128
constexpr int kThreads = 256;
constexpr int kRows = 4;  // rows per block

// ---- CUDA kernels ----

/// kRows rows per block. A unit is kVec consecutive pairs (x1 at j, x2 at j + head_dim / 4) of
/// one half of one head's q or k in one row: two kVec-wide accesses (16 bytes each when
/// kVec == 8).
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    rotary_qkv_kernel(__half* qkv, std::int64_t tokens, int heads, int head_dim,
                      const int* positions, const int* block_positions, float sign,
                      RotaryFreqs f) {
  chain_release();
  chain_wait();
  __shared__ float cos_t[kRows][2][kMaxQuarter], sin_t[kRows][2][kMaxQuarter];
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(tokens - row0 < kRows ? tokens - row0 : kRows);
  const int quarter = head_dim / 4, half = head_dim / 2;
  for (int i = threadIdx.x; i < rows * 2 * quarter; i += blockDim.x) {
    const int r = i / (2 * quarter), which = i / quarter % 2, j = i % quarter;
    const int pos = which == 0 ? positions[row0 + r] : block_positions[row0 + r];
    rotary_cos_sin(pos, f.inv_freq[j], sign, cos_t[r][which][j], sin_t[r][which][j]);
  }
  __syncthreads();
  const int groups = quarter / kVec;
  const int units = heads * 2 * 2 * groups;  // per row: (head, q or k, which half, group)
  for (int i = threadIdx.x; i < rows * units; i += blockDim.x) {
    const int r = i / units, u = i % units;
    const int j0 = (u % groups) * kVec, which = (u / groups) % 2, qk = (u / groups / 2) % 2;
    const int h = u / groups / 4;
    __half* x = qkv + (row0 + r) * 3 * heads * head_dim + h * 3 * head_dim + qk * head_dim +
                which * half + j0;
    HalfVec<kVec> a = *reinterpret_cast<const HalfVec<kVec>*>(x);
    HalfVec<kVec> e = *reinterpret_cast<const HalfVec<kVec>*>(x + quarter);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      rotate_pair(__half2float(a.v[k]), __half2float(e.v[k]), cos_t[r][which][j0 + k],
                  sin_t[r][which][j0 + k], a.v[k], e.v[k]);
    }
    *reinterpret_cast<HalfVec<kVec>*>(x) = a;
    *reinterpret_cast<HalfVec<kVec>*>(x + quarter) = e;
  }
}

}  // namespace

// ---- kernel launcher ----

RotaryFreqs rotary_freqs(int head_dim) {
  QG_CHECK(head_dim % 4 == 0 && head_dim >= 4 && head_dim / 4 <= kMaxQuarter, "head_dim ", head_dim,
           " must be a multiple of 4 up to 128 for the rotary");
  RotaryFreqs f{};
  const std::vector<float> table = model::glm_rotary_inv_freq(head_dim / 2);
  for (std::size_t j = 0; j < table.size(); ++j) f.inv_freq[j] = table[j];
  return f;
}

void glm_rotary_qkv(__half* qkv, std::int64_t tokens, int heads, int head_dim,
                    const int* positions, const int* block_positions, bool inverse,
                    cudaStream_t stream) {
  QG_CHECK(qkv && positions && block_positions, "glm_rotary_qkv: null pointer");
  QG_CHECK(tokens >= 0 && tokens <= 0x7fffffff && heads > 0, "glm_rotary_qkv: ", tokens,
           " tokens, ", heads, " heads");
  QG_CHECK(head_dim % 4 == 0 && head_dim >= 4 && head_dim / 4 <= kMaxQuarter,
           "glm_rotary_qkv: head_dim ", head_dim, " must be a multiple of 4 up to 128");
  if (tokens == 0) return;
  const RotaryFreqs f = rotary_freqs(head_dim);
  const float sign = inverse ? -1.0f : 1.0f;
  const auto blocks = static_cast<unsigned>((tokens + kRows - 1) / kRows);
  const bool vec8 = head_dim % 32 == 0 && aligned16(qkv);  // quarters of 8k pairs: 16-byte units
  launch_chained(vec8 ? rotary_qkv_kernel<8> : rotary_qkv_kernel<1>, dim3(blocks), dim3(kThreads),
                 0, stream, qkv, tokens, heads, head_dim, positions, block_positions, sign, f);
}

}  // namespace qg::cuda
