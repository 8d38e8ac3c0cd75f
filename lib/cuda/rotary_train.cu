// glm_rotary_qkv (include/qinggeng/cuda/attention_train.h): the 2-D rotary of a training step,
// in place on the q and k slices of fused qkv rows, forward or inverse (the backward of the
// rotation is the rotation by the negated angles). One block per row; each thread rotates one
// (x1, x2) pair of one half of one head, for q and k, after the row's angles are tabulated in
// shared memory. The frequencies are model/rotary.h's (the fp16-rounded table of the release),
// the same the inference append kernel and the CPU reference use.
#include <cstdint>
#include <vector>

#include "cuda/check.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"
#include "qinggeng/model/rotary.h"

namespace qg::cuda {
namespace {

constexpr int kMaxQuarter = 32;  // head_dim / 4 for head_dim <= 128
constexpr int kThreads = 256;

struct RotaryFreqs {
  float inv_freq[kMaxQuarter];
};

// ---- CUDA kernels ----

__global__ void __launch_bounds__(kThreads)
    rotary_qkv_kernel(__half* qkv, int heads, int head_dim, const int* positions,
                      const int* block_positions, float sign, RotaryFreqs f) {
  __shared__ float cos_t[2][kMaxQuarter], sin_t[2][kMaxQuarter];
  const int row = blockIdx.x;
  const int quarter = head_dim / 4, half = head_dim / 2;
  if (threadIdx.x < 2 * quarter) {
    const int which = threadIdx.x / quarter, j = threadIdx.x % quarter;
    const int pos = which == 0 ? positions[row] : block_positions[row];
    float s, c;
    sincosf(static_cast<float>(pos) * f.inv_freq[j], &s, &c);
    cos_t[which][j] = c;
    sin_t[which][j] = sign * s;
  }
  __syncthreads();
  __half* base = qkv + static_cast<std::size_t>(row) * 3 * heads * head_dim;
  const int pairs = heads * 2 * half / 2;  // per head: 2 halves x quarter pairs, for q and k
  for (int p = threadIdx.x; p < 2 * pairs; p += blockDim.x) {
    const int qk = p / pairs, rest = p % pairs;  // qk 0: q slice, 1: k slice
    const int h = rest / half, r = rest % half, which = r / quarter, j = r % quarter;
    __half* x = base + h * 3 * head_dim + qk * head_dim + which * half + j;
    const float a = __half2float(x[0]), e = __half2float(x[quarter]);
    const float c = cos_t[which][j], s = sin_t[which][j];
    x[0] = __float2half_rn(a * c - e * s);
    x[quarter] = __float2half_rn(e * c + a * s);
  }
}

}  // namespace

// ---- kernel launcher ----

void glm_rotary_qkv(__half* qkv, std::int64_t tokens, int heads, int head_dim,
                    const int* positions, const int* block_positions, bool inverse,
                    cudaStream_t stream) {
  QG_CHECK(qkv && positions && block_positions, "glm_rotary_qkv: null pointer");
  QG_CHECK(tokens >= 0 && tokens <= 0x7fffffff && heads > 0, "glm_rotary_qkv: ", tokens,
           " tokens, ", heads, " heads");
  QG_CHECK(head_dim % 4 == 0 && head_dim >= 4 && head_dim / 4 <= kMaxQuarter,
           "glm_rotary_qkv: head_dim ", head_dim, " must be a multiple of 4 up to 128");
  if (tokens == 0) return;
  RotaryFreqs f{};
  const std::vector<float> table = model::glm_rotary_inv_freq(head_dim / 2);
  for (std::size_t j = 0; j < table.size(); ++j) f.inv_freq[j] = table[j];
  rotary_qkv_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      qkv, heads, head_dim, positions, block_positions, inverse ? -1.0f : 1.0f, f);
  QG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qg::cuda
