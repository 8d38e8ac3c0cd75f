// Step 1 of GLM attention (see include/qinggeng/cuda/attention.h): the metadata upload, the
// fused 2-D rotary + KV-cache append kernel, and attention_forward, which chains the steps.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/attention_tiles.cuh"
#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/half_vector.cuh"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::cuda {
namespace {

constexpr int kMaxQuarter = 32;  // head_dim / 4 for head_dim <= 128

/// inv_freq[j] = 10000^(-2j/rot) rounded through fp16 (rot = head_dim / 2), as the released
/// model's half-precision buffer holds it; passed by value so no constant memory is needed.
struct RotaryTable {
  float inv_freq[kMaxQuarter];
};

RotaryTable make_rotary_table(int head_dim) {
  RotaryTable t{};
  const int rot = head_dim / 2;
  for (int j = 0; j < rot / 2; ++j) {
    const float exact = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * j / rot));
    t.inv_freq[j] = half_to_float(float_to_half(exact));
  }
  return t;
}

// ---- CUDA kernels ----

/// Sequence owning row `row` (row_start is ascending, row_start[0] = 0).
__device__ int sequence_of_row(const int* row_start, int num_seqs, int row) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (row_start[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Grid (token, slice of the token's heads); each thread owns kVec consecutive rotation pairs
// (x1[j..j+kVec), x2[j..j+kVec)) of one half of one head, for q, k and v at once, so every
// load is a kVec-wide vector and all of a thread's loads are in flight together. The token's
// angles are computed once per block into shared memory.
template <int kVec>
__global__ void append_kernel(const __half* __restrict__ qkv, AttentionBatch b, PagedKvLayer kv,
                              __half* __restrict__ out, RotaryTable rot) {
  __shared__ float cos_t[2][kMaxQuarter], sin_t[2][kMaxQuarter];
  chain_release();
  chain_wait();
  const int row = blockIdx.x;
  const int D = kv.head_dim, quarter = D / 4, half = D / 2, H = kv.num_heads * D;
  if (threadIdx.x < 2 * quarter) {
    const int which = threadIdx.x / quarter, j = threadIdx.x % quarter;
    const int pos = which == 0 ? b.positions[row] : b.block_positions[row];
    float s, c;
    sincosf(static_cast<float>(pos) * rot.inv_freq[j], &s, &c);
    cos_t[which][j] = c;
    sin_t[which][j] = s;
  }
  __syncthreads();
  const int per_head = half / kVec;
  const int p = blockIdx.y * blockDim.x + threadIdx.x;
  if (p >= kv.num_heads * per_head) return;
  const int h = p / per_head, r = (p % per_head) * kVec, which = r / quarter, j0 = r % quarter;
  const int at = which * half + j0;  // x1's first index in the head; x2 is at + quarter

  const int seq = sequence_of_row(b.row_start, b.num_seqs, row);
  const int token = b.past[seq] + row - b.row_start[seq];
  const int block = b.block_tables[seq * b.max_blocks + (token >> kv.block_shift)];
  const std::size_t cache_at =
      ((static_cast<std::size_t>(block) * kv.num_heads + h) * kv.block_size +
       (token & (kv.block_size - 1))) * D;
  using Vec = HalfVec<kVec>;
  const __half* src = qkv + static_cast<std::size_t>(row) * 3 * H + h * 3 * D;
  const Vec q1 = *reinterpret_cast<const Vec*>(src + at);
  const Vec q2 = *reinterpret_cast<const Vec*>(src + at + quarter);
  const Vec k1 = *reinterpret_cast<const Vec*>(src + D + at);
  const Vec k2 = *reinterpret_cast<const Vec*>(src + D + at + quarter);
  const Vec v1 = *reinterpret_cast<const Vec*>(src + 2 * D + at);
  const Vec v2 = *reinterpret_cast<const Vec*>(src + 2 * D + at + quarter);
  const auto rotate = [&](const Vec& x1, const Vec& x2, __half* dst) {
    Vec y1, y2;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float c = cos_t[which][j0 + i], s = sin_t[which][j0 + i];
      const float a = __half2float(x1.v[i]), e = __half2float(x2.v[i]);
      y1.v[i] = __float2half_rn(a * c - e * s);
      y2.v[i] = __float2half_rn(e * c + a * s);
    }
    *reinterpret_cast<Vec*>(dst + at) = y1;
    *reinterpret_cast<Vec*>(dst + at + quarter) = y2;
  };
  rotate(q1, q2, out + static_cast<std::size_t>(row) * H + h * D);
  rotate(k1, k2, kv.keys + cache_at);
  *reinterpret_cast<Vec*>(kv.values + cache_at + at) = v1;
  *reinterpret_cast<Vec*>(kv.values + cache_at + at + quarter) = v2;
}

}  // namespace

// ---- host helpers ----
namespace attn {

float softmax_scale_log2(int head_dim) {
  return static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
}

void check_attention_args(const AttentionBatch& b, const PagedKvLayer& kv, const void* out,
                          const char* what) {
  QG_CHECK(kv.head_dim == 16 || kv.head_dim == 32 || kv.head_dim == 64 || kv.head_dim == 128,
           what, ": head_dim ", kv.head_dim, " is not supported (16, 32, 64 or 128)");
  QG_CHECK(kv.keys && kv.values && kv.num_heads > 0 && kv.block_size == (1 << kv.block_shift),
           what, ": the KV layer view is empty or its block_size is not 2^block_shift");
  QG_CHECK(out != nullptr, what, ": output pointer is null");
  QG_CHECK(b.num_seqs > 0 && b.total_tokens > 0 && b.row_start && b.past && b.block_tables, what,
           ": empty batch (build it with AttentionMetadata)");
}

}  // namespace attn

// ---- metadata ----

AttentionMetadata::~AttentionMetadata() {
  if (uploaded_) cudaEventDestroy(uploaded_);
  if (device_) cudaFree(device_);
  if (pinned_) cudaFreeHost(pinned_);
}

void AttentionMetadata::reserve(std::size_t ints) {
  if (ints <= capacity_) return;
  // Grow geometrically: block tables widen by one block every block_size decode steps, and
  // cudaMallocHost / cudaFree cost milliseconds (cudaFree also waits for the device).
  ints = std::max({ints, 2 * capacity_, std::size_t(1) << 14});
  if (uploaded_) QG_CUDA_CHECK(cudaEventSynchronize(uploaded_));
  if (device_) QG_CUDA_CHECK(cudaFree(device_));
  if (pinned_) QG_CUDA_CHECK(cudaFreeHost(pinned_));
  device_ = nullptr;
  pinned_ = nullptr;
  capacity_ = 0;
  QG_CUDA_CHECK(cudaMalloc(&device_, ints * sizeof(int)));
  QG_CUDA_CHECK(cudaMallocHost(&pinned_, ints * sizeof(int)));
  capacity_ = ints;
}

AttentionBatch AttentionMetadata::build(const std::vector<AttentionSequence>& seqs,
                                        int block_size, cudaStream_t stream) {
  QG_CHECK(!seqs.empty(), "attention metadata: the batch has no sequences");
  QG_CHECK(block_size > 0, "attention metadata: block_size ", block_size, " must be positive");
  AttentionBatch b;
  b.num_seqs = static_cast<int>(seqs.size());
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    const auto& q = seqs[s];
    const int n = static_cast<int>(q.positions.size());
    QG_CHECK(n > 0, "attention metadata: sequence ", s, " has no new tokens");
    QG_CHECK(q.block_positions.size() == q.positions.size(), "attention metadata: sequence ", s,
             " has ", n, " positions but ", q.block_positions.size(), " block_positions");
    QG_CHECK(q.past >= 0 && q.context_length >= 0, "attention metadata: sequence ", s,
             " has past ", q.past, " and context_length ", q.context_length,
             " (must be >= 0)");
    QG_CHECK(q.block_table != nullptr, "attention metadata: sequence ", s, " has no block table");
    const long long need = (static_cast<long long>(q.past) + n + block_size - 1) / block_size;
    QG_CHECK(static_cast<long long>(q.block_table->size()) >= need, "attention metadata: sequence ",
             s, "'s block table has ", q.block_table->size(), " blocks, ", need,
             " needed for ", q.past + n, " tokens");
    b.total_tokens += n;
    b.max_new_tokens = std::max(b.max_new_tokens, n);
    b.max_kv_len = std::max(b.max_kv_len, q.past + n);
    b.max_blocks = std::max(b.max_blocks, static_cast<int>(need));
  }
  const std::size_t S = seqs.size(), T = static_cast<std::size_t>(b.total_tokens);
  const std::size_t tables = S * static_cast<std::size_t>(b.max_blocks);
  const std::size_t ints = (S + 1) + 2 * S + 2 * T + tables;
  reserve(ints);
  if (uploaded_) {
    QG_CUDA_CHECK(cudaEventSynchronize(uploaded_));  // the last upload may still read pinned_
  } else {
    QG_CUDA_CHECK(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming));
  }
  int* row_start = pinned_;
  int* past = row_start + S + 1;
  int* ctx = past + S;
  int* pos = ctx + S;
  int* bpos = pos + T;
  int* table = bpos + T;
  row_start[0] = 0;
  for (std::size_t s = 0; s < S; ++s) {
    const auto& q = seqs[s];
    const std::size_t n = q.positions.size();
    row_start[s + 1] = row_start[s] + static_cast<int>(n);
    past[s] = q.past;
    ctx[s] = q.context_length;
    std::memcpy(pos + row_start[s], q.positions.data(), n * sizeof(int));
    std::memcpy(bpos + row_start[s], q.block_positions.data(), n * sizeof(int));
    int* row = table + s * static_cast<std::size_t>(b.max_blocks);
    for (int i = 0; i < b.max_blocks; ++i) {
      row[i] = i < static_cast<int>(q.block_table->size())
                   ? (*q.block_table)[static_cast<std::size_t>(i)] : -1;
    }
  }
  QG_CUDA_CHECK(cudaMemcpyAsync(device_, pinned_, ints * sizeof(int), cudaMemcpyHostToDevice,
                                stream));
  QG_CUDA_CHECK(cudaEventRecord(uploaded_, stream));
  const auto at = [&](const int* p) { return device_ + (p - pinned_); };
  b.row_start = at(row_start);
  b.past = at(past);
  b.context_length = at(ctx);
  b.positions = at(pos);
  b.block_positions = at(bpos);
  b.block_tables = at(table);
  return b;
}

// ---- kernel launchers ----

void attention_append(const __half* qkv, const AttentionBatch& batch, const PagedKvLayer& kv,
                      __half* out, cudaStream_t stream) {
  attn::check_attention_args(batch, kv, out, "attention_append");
  QG_CHECK(qkv != nullptr, "attention_append: qkv pointer is null");
  // head_dim / 4 consecutive pairs per half: 8-wide vectors, or 4-wide for head_dim 16.
  const int vec = kv.head_dim >= 32 ? 8 : 4;
  const int threads = 128, vectors = kv.num_heads * kv.head_dim / 2 / vec;
  const dim3 grid(static_cast<unsigned>(batch.total_tokens), (vectors + threads - 1) / threads);
  const RotaryTable rot = make_rotary_table(kv.head_dim);
  launch_chained(vec == 8 ? append_kernel<8> : append_kernel<4>, grid, dim3(threads), 0, stream,
                 qkv, batch, kv, out, rot);
}

void attention_forward(const __half* qkv, const AttentionBatch& batch, const PagedKvLayer& kv,
                       __half* out, float* workspace, int num_sms, cudaStream_t stream) {
  attention_append(qkv, batch, kv, out, stream);
  if (batch.max_new_tokens == 1 && workspace != nullptr) {
    attention_decode(batch, kv, out, workspace, num_sms, stream);
  } else {
    attention_prefill(batch, kv, out, stream);
  }
}

}  // namespace qg::cuda
