// Step 3 of GLM attention: split-KV flash-decoding for one new token per sequence.
// Decode is bound by reading the cache, so the kernel is built around 16-byte loads: a group
// of D/8 lanes covers one key row (each lane 8 dims of K and V), a warp covers 32/(D/8) keys
// per step, and each lane keeps kUnroll keys' K and V loads in flight before using them.
// Every (sequence, head) is cut into `splits` key ranges, one thread block each, so a batch of
// one still spreads over the whole GPU; each block leaves an unnormalised partial (max, sum,
// accumulator) in the workspace and a combine kernel merges them into the fp16 output.
// With one query at the end of the sequence the GLM mask hides nothing: every cached key is
// visible.
#include <algorithm>

#include "cuda/attention_tiles.cuh"
#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 64;
constexpr int kUnroll = 4;

/// Workspace layout: acc [seqs][heads][kMaxSplits][D], then max and sum [seqs][heads][kMaxSplits].
struct Partials {
  float* acc;
  float* max;
  float* sum;
};

/// How the keys of every (sequence, head) are split: enough splits to give every
/// multiprocessor a few blocks (`wanted`, from the batch and device size), but no split
/// shorter than kMinKeysPerSplit keys (below that the combine costs more than it saves).
/// Computed on the host for the grid and again on the device from the (possibly device-side)
/// max_kv_len, so a graph replay splits exactly like a direct launch. `bound` (the split
/// count before rounding to whole keys_per_split) never decreases with max_kv_len and is
/// >= splits, so the bound of a capacity covers every shorter length.
struct Split {
  int splits, keys_per_split, bound;
};
__host__ __device__ inline Split split_keys(int max_kv_len, int wanted) {
  const int max_useful = (max_kv_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  int splits = wanted < max_useful ? wanted : max_useful;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits > 1 ? splits : 1;
  const int keys_per_split = max_kv_len > 0 ? (max_kv_len + splits - 1) / splits : 1;
  return Split{(max_kv_len + keys_per_split - 1) / keys_per_split, keys_per_split, splits};
}

/// The max_kv_len the kernels split by: the device value when the batch carries one.
__device__ inline int split_length(const AttentionBatch& b) {
  return b.max_kv_len_on_device ? *b.max_kv_len_on_device : b.max_kv_len;
}

Partials partials_of(float* ws, int num_seqs, int num_heads, int head_dim) {
  const std::size_t slots = static_cast<std::size_t>(num_seqs) * num_heads * kMaxSplits;
  return Partials{ws, ws + slots * head_dim, ws + slots * head_dim + slots};
}

// ---- CUDA kernels ----

template <int D>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(AttentionBatch b, PagedKvLayer kv, const __half* __restrict__ q_rows,
                        Partials part, int wanted_splits, float scale_log2) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kGroups = kWarps * kKeysPerWarp;  // independent softmax states per block
  __shared__ float s_max[kGroups], s_sum[kGroups], s_acc[kGroups][D];

  chain_release();
  chain_wait();
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const Split sp = split_keys(split_length(b), wanted_splits);
  if (split >= sp.splits) return;  // surplus block of a capacity-sized grid
  const int keys_per_split = sp.keys_per_split;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerKey, part8 = lane % kLanesPerKey;
  const int group = warp * kKeysPerWarp + sub;
  const int row = b.row_start[seq];
  const int kv_len = b.past[seq] + 1;
  const int begin = split * keys_per_split, end = min(kv_len, begin + keys_per_split);
  const int* table = b.block_tables + static_cast<std::size_t>(seq) * b.max_blocks;
  const int H = kv.num_heads * D;

  float q[8];
  {
    const uint4 raw = *reinterpret_cast<const uint4*>(q_rows + static_cast<std::size_t>(row) * H +
                                                      head * D + part8 * 8);
    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h2[i]);
      q[2 * i] = f.x * scale_log2;
      q[2 * i + 1] = f.y * scale_log2;
    }
  }
  float m = -INFINITY, l = 0.0f, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  constexpr int kStride = kGroups;  // keys between a group's consecutive keys
  // The trip count is uniform over the warp (the shuffles below need every lane).
  for (int k0 = begin + warp * kKeysPerWarp; k0 < end; k0 += kStride * kUnroll) {
    uint4 kr[kUnroll], vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = k0 + sub + u * kStride;
      if (key < end) {
        const std::size_t at =
            ((((static_cast<std::size_t>(table[key >> kv.block_shift]) * kv.num_heads + head)
               << kv.block_shift) | (key & (kv.block_size - 1))) * D + part8 * 8);
        kr[u] = *reinterpret_cast<const uint4*>(kv.keys + at);
        vr[u] = *reinterpret_cast<const uint4*>(kv.values + at);
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float score[kUnroll];
    float step_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const __half2* k2 = reinterpret_cast<const __half2*>(&kr[u]);
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(k2[i]);
        d += q[2 * i] * f.x + q[2 * i + 1] * f.y;
      }
#pragma unroll
      for (int off = kLanesPerKey / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
      score[u] = k0 + sub + u * kStride < end ? d : -INFINITY;
      step_max = fmaxf(step_max, score[u]);
    }
    if (step_max == -INFINITY) continue;  // this lane group's keys all lie past the end
    const float new_max = fmaxf(m, step_max);
    const float alpha = exp2f(m - new_max);
    m = new_max;
    l *= alpha;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float p = exp2f(score[u] - m);
      l += p;
      const __half2* v2 = reinterpret_cast<const __half2*>(&vr[u]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(v2[i]);
        acc[2 * i] += p * f.x;
        acc[2 * i + 1] += p * f.y;
      }
    }
  }
  if (part8 == 0) {
    s_max[group] = m;
    s_sum[group] = l;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) s_acc[group][part8 * 8 + i] = acc[i];
  __syncthreads();

  // Merge the block's groups; groups that saw no key have max -inf and contribute nothing.
  const std::size_t slot =
      (static_cast<std::size_t>(seq) * kv.num_heads + head) * kMaxSplits + split;
  float block_max = -INFINITY;
  for (int gi = 0; gi < kGroups; ++gi) block_max = fmaxf(block_max, s_max[gi]);
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float a = 0.0f, total = 0.0f;
    if (block_max != -INFINITY) {
      for (int gi = 0; gi < kGroups; ++gi) {
        const float w = exp2f(s_max[gi] - block_max);
        a += w * s_acc[gi][d];
        total += w * s_sum[gi];
      }
    }
    part.acc[slot * D + d] = a;
    if (d == 0) {
      part.max[slot] = block_max;
      part.sum[slot] = total;
    }
  }
}

template <int D>
__global__ void decode_combine_kernel(AttentionBatch b, int num_heads, Partials part,
                                      int wanted_splits, __half* __restrict__ out) {
  chain_release();
  chain_wait();
  const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
  const int splits = split_keys(split_length(b), wanted_splits).splits;
  const std::size_t base = (static_cast<std::size_t>(seq) * num_heads + head) * kMaxSplits;
  float global_max = -INFINITY;
  for (int s = 0; s < splits; ++s) global_max = fmaxf(global_max, part.max[base + s]);
  float a = 0.0f, total = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = part.max[base + s];
    if (ms == -INFINITY) continue;  // an empty split (past the sequence's end)
    const float w = exp2f(ms - global_max);
    a += w * part.acc[(base + s) * D + d];
    total += w * part.sum[base + s];
  }
  out[static_cast<std::size_t>(b.row_start[seq]) * num_heads * D + head * D + d] =
      __float2half_rn(a / total);
}

template <int D>
void launch_decode(const AttentionBatch& b, const PagedKvLayer& kv, __half* out, float* ws,
                   int num_sms, cudaStream_t stream) {
  const int pairs = b.num_seqs * kv.num_heads;
  const int wanted = (4 * std::max(num_sms, 1) + pairs - 1) / pairs;
  // With a device-side length, max_kv_len is a capacity: size the grid by its bound.
  const Split host = split_keys(b.max_kv_len, wanted);
  const int grid_splits = b.max_kv_len_on_device ? host.bound : host.splits;
  const Partials part = partials_of(ws, b.num_seqs, kv.num_heads, D);
  launch_chained(decode_split_kernel<D>, dim3(grid_splits, kv.num_heads, b.num_seqs),
                 dim3(kThreads), 0, stream, b, kv, out, part, wanted,
                 attn::softmax_scale_log2(D));
  launch_chained(decode_combine_kernel<D>, dim3(kv.num_heads, b.num_seqs), dim3(D), 0, stream, b,
                 kv.num_heads, part, wanted, out);
}

}  // namespace

// ---- kernel launchers ----

std::size_t attention_decode_workspace_floats(int num_seqs, int num_heads, int head_dim) {
  return static_cast<std::size_t>(num_seqs) * num_heads * kMaxSplits * (head_dim + 2);
}

void attention_decode(const AttentionBatch& batch, const PagedKvLayer& kv, __half* out,
                      float* workspace, int num_sms, cudaStream_t stream) {
  attn::check_attention_args(batch, kv, out, "attention_decode");
  QG_CHECK(batch.max_new_tokens == 1 && batch.total_tokens == batch.num_seqs,
           "attention_decode: every sequence must have exactly one new token (max_new_tokens ",
           batch.max_new_tokens, ", ", batch.total_tokens, " rows for ", batch.num_seqs,
           " sequences); use attention_prefill");
  QG_CHECK(workspace != nullptr, "attention_decode: workspace is null");
  switch (kv.head_dim) {
    case 16: launch_decode<16>(batch, kv, out, workspace, num_sms, stream); break;
    case 32: launch_decode<32>(batch, kv, out, workspace, num_sms, stream); break;
    case 64: launch_decode<64>(batch, kv, out, workspace, num_sms, stream); break;
    default: launch_decode<128>(batch, kv, out, workspace, num_sms, stream); break;
  }
}

}  // namespace qg::cuda
