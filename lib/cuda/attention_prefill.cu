// Step 2 of GLM attention: FlashAttention-2 style prefill/varlen kernel over the paged cache,
// and the same kernel body over packed qkv rows as the training forward
// (include/qinggeng/cuda/attention_train.h), which also saves each row's log-sum-exp.
// One thread block = (sequence, head, 64 new queries), 4 warps of 16 query rows each. Q stays in
// registers as mma A fragments; 64-key K and V tiles stream through swizzled shared memory with
// cp.async (the next K tile loads during softmax and P.V, the next V tile during Q.K^T);
// scores, the online softmax (log2 domain, fp32) and the output accumulators stay in registers.
// The GLM mask makes every query's visible keys a prefix [0, max(ctx, i + 1)), so the key loop
// simply stops at the tile's last visible key and only tiles crossing a row's limit are masked.
#include "cuda/attention_tiles.cuh"
#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

constexpr int kBlockM = 64;   // queries per thread block
constexpr int kBlockN = 64;   // keys per tile
constexpr int kThreads = 128;

template <int D>
constexpr int prefill_smem_bytes() {
  return (kBlockM + 2 * kBlockN) * D * static_cast<int>(sizeof(__half));
}

// ---- where a (sequence, head)'s rows live ----

/// Inference: rotated q in `out` (written there by attention_append), keys and values in the
/// paged cache, the result written over q.
template <int D>
struct PagedRows {
  AttentionBatch b;
  PagedKvLayer kv;
  __half* out;
  int seq, head;
  const int* table;

  __device__ PagedRows(const AttentionBatch& b_, const PagedKvLayer& kv_, __half* out_, int seq_,
                       int head_)
      : b(b_), kv(kv_), out(out_), seq(seq_), head(head_),
        table(b_.block_tables + static_cast<std::size_t>(seq_) * b_.max_blocks) {}
  __device__ int first_row() const { return b.row_start[seq]; }
  __device__ int rows() const { return b.row_start[seq + 1] - b.row_start[seq]; }
  __device__ int past() const { return b.past[seq]; }
  __device__ int context() const { return b.context_length[seq]; }
  __device__ const __half* query(int r) const {
    return out + static_cast<std::size_t>(first_row() + r) * kv.num_heads * D + head * D;
  }
  __device__ __half* result(int r) const { return const_cast<__half*>(query(r)); }
  __device__ const __half* key_base() const { return kv.keys; }
  __device__ const __half* value_base() const { return kv.values; }
  /// Row `key` of the keys (or values) at `base`.
  __device__ const __half* kv_row(const __half* base, int key) const {
    const int block = table[key >> kv.block_shift];
    return base + (((static_cast<std::size_t>(block) * kv.num_heads + head) << kv.block_shift) |
                   (key & (kv.block_size - 1))) * D;
  }
};

/// Training: q, k and v slices of packed qkv rows ([T, 3 * heads * D]), no past tokens, the
/// result into `out` ([T, heads * D]).
template <int D>
struct PackedRows {
  TrainAttentionBatch b;
  const __half* qkv;
  __half* out;
  int heads, seq, head;

  __device__ int first_row() const { return b.row_start[seq]; }
  __device__ int rows() const { return b.row_start[seq + 1] - b.row_start[seq]; }
  __device__ int past() const { return 0; }
  __device__ int context() const { return b.context_length[seq]; }
  __device__ const __half* query(int r) const {
    return qkv + static_cast<std::size_t>(first_row() + r) * 3 * heads * D + head * 3 * D;
  }
  __device__ __half* result(int r) const {
    return out + static_cast<std::size_t>(first_row() + r) * heads * D + head * D;
  }
  __device__ const __half* key_base() const { return qkv + D; }
  __device__ const __half* value_base() const { return qkv + 2 * D; }
  __device__ const __half* kv_row(const __half* base, int key) const {
    return base + static_cast<std::size_t>(first_row() + key) * 3 * heads * D + head * 3 * D;
  }
};

// ---- CUDA kernels ----

/// Issues cp.async loads of key (or value) rows [first, first + kBlockN) into a swizzled tile;
/// rows at or past `limit` are zero-filled (P is 0 there, and 0 * garbage could be NaN).
template <int D, class Rows>
__device__ void load_kv_tile(__half* tile, const Rows& src, const __half* base, int first,
                             int limit) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kBlockN * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks, key = first + row;
    const bool valid = key < limit;
    const __half* from = valid ? src.kv_row(base, key) + chunk * 8 : base;
    attn::cp_async_16(tile + attn::tile_offset<D>(row, chunk), from, valid);
  }
}

/// Softmax(q k^T) v for 64 queries of one (sequence, head); with `lse` set, also the natural
/// log-sum-exp of each query row's scaled, masked scores at lse[row * lse_stride].
template <int D, class Rows>
__device__ void prefill_tile(const Rows& src, int m0, float scale_log2, float* lse,
                             int lse_stride) {
  constexpr int kChunks = D / 8, kDimSteps = D / 16, kKeyTiles8 = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* sQ = reinterpret_cast<__half*>(smem_raw);
  __half* sK = sQ + kBlockM * D;
  __half* sV = sK + kBlockN * D;

  const int n = src.rows();
  if (m0 >= n) return;
  const int past = src.past(), ctx = src.context(), kv_len = past + n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // Keys visible to query row r (absolute index past + m0 + r) end at limit(r); the last row of
  // the tile sees the most, the first row the fewest.
  const auto limit = [&](int r) { return min(kv_len, max(ctx, past + m0 + r + 1)); };
  const int kv_end = limit(min(kBlockM, n - m0) - 1);
  const int all_visible_end = limit(0);

  for (int c = threadIdx.x; c < kBlockM * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = m0 + row < n;
    const __half* from = valid ? src.query(m0 + row) + chunk * 8 : src.key_base();
    attn::cp_async_16(sQ + attn::tile_offset<D>(row, chunk), from, valid);
  }
  attn::cp_async_commit();
  load_kv_tile<D>(sK, src, src.key_base(), 0, kv_end);
  attn::cp_async_commit();
  load_kv_tile<D>(sV, src, src.value_base(), 0, kv_end);
  attn::cp_async_commit();

  std::uint32_t qf[kDimSteps][4];
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  const int my_limit[2] = {limit(my_row[0]), limit(my_row[1])};

  for (int n0 = 0; n0 < kv_end; n0 += kBlockN) {
    attn::cp_async_wait<1>();  // Q (first time) and this K tile have landed
    __syncthreads();
    if (n0 == 0) {
#pragma unroll
      for (int kk = 0; kk < kDimSteps; ++kk) {
        const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        attn::ldmatrix_x4(qf[kk], sQ + attn::tile_offset<D>(row, kk * 2 + lane / 16));
      }
    }
    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kKeyTiles8][4];
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kKeyTiles8 / 2; ++np) {
        std::uint32_t kb[4];
        const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
        attn::ldmatrix_x4(kb, sK + attn::tile_offset<D>(key, kk * 2 + (lane / 8) % 2));
        attn::mma_16816_pair(s, np, qf[kk], kb);
      }
    }
    __syncthreads();  // every warp is done with sK: start loading the next K tile
    if (n0 + kBlockN < kv_end) load_kv_tile<D>(sK, src, src.key_base(), n0 + kBlockN, kv_end);
    attn::cp_async_commit();

    // Mask (only tiles that cross some row's limit) and online softmax, rows g and g + 8.
    const bool needs_mask = n0 + kBlockN > all_visible_end;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        float v = s[j][e] * scale_log2;
        if (needs_mask && key >= my_limit[e / 2]) v = -INFINITY;
        s[j][e] = v;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], v);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Key 0 is visible to every row, so after the first tile row_max is finite.
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      alpha[r] = exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - row_max[e / 2]);
        row_sum[e / 2] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    attn::cp_async_wait<1>();  // this V tile has landed (the next K tile may be in flight)
    __syncthreads();
    // O += P V: P's accumulator layout is exactly the A fragment layout of the next mma.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const std::uint32_t pa[4] = {attn::pack_half2(s[2 * kk][0], s[2 * kk][1]),
                                   attn::pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                   attn::pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   attn::pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t vb[4];
        const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        attn::ldmatrix_x4_trans(vb, sV + attn::tile_offset<D>(key, dp * 2 + lane / 16));
        attn::mma_16816_pair(o, dp, pa, vb);
      }
    }
    __syncthreads();  // every warp is done with sV: start loading the next V tile
    if (n0 + kBlockN < kv_end) load_kv_tile<D>(sV, src, src.value_base(), n0 + kBlockN, kv_end);
    attn::cp_async_commit();
  }
  attn::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    if (m0 + my_row[r] >= n) continue;
    const float inv = 1.0f / row_sum[r];
    if (lse != nullptr && t == 0) {
      // row_max is in the log2 domain of the scaled scores: ln(sum) = ln 2 (max + log2 sum).
      lse[static_cast<std::size_t>(src.first_row() + m0 + my_row[r]) * lse_stride] =
          0.6931471805599453f * (row_max[r] + log2f(row_sum[r]));
    }
    __half* dst = src.result(m0 + my_row[r]) + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<__half2*>(dst + j * 8) =
          __floats2half2_rn(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
  }
}

// Query tiles run last-first: with a causal tail the last tiles see the most keys, and
// starting them first keeps the final wave short.
template <int D>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(AttentionBatch b, PagedKvLayer kv, __half* out, float scale_log2) {
  const PagedRows<D> src(b, kv, out, blockIdx.z, blockIdx.y);
  prefill_tile<D>(src, (gridDim.x - 1 - blockIdx.x) * kBlockM, scale_log2, nullptr, 0);
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    train_forward_kernel(TrainAttentionBatch b, const __half* qkv, int heads, __half* out,
                         float* lse, float scale_log2) {
  chain_release();
  chain_wait();
  const PackedRows<D> src{b, qkv, out, heads, static_cast<int>(blockIdx.z),
                          static_cast<int>(blockIdx.y)};
  prefill_tile<D>(src, (gridDim.x - 1 - blockIdx.x) * kBlockM, scale_log2,
                  lse + blockIdx.y, heads);
}

template <int D>
void launch_prefill(const AttentionBatch& b, const PagedKvLayer& kv, __half* out,
                    cudaStream_t stream) {
  const dim3 grid((b.max_new_tokens + kBlockM - 1) / kBlockM, kv.num_heads, b.num_seqs);
  constexpr int smem = prefill_smem_bytes<D>();
  prefill_kernel<D><<<grid, kThreads, smem, stream>>>(b, kv, out,
                                                      attn::softmax_scale_log2(D));
  QG_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void launch_train_forward(const __half* qkv, const TrainAttentionBatch& b, int heads,
                          __half* out, float* lse, cudaStream_t stream) {
  const dim3 grid((b.max_seq_len + kBlockM - 1) / kBlockM, heads, b.num_seqs);
  constexpr int smem = prefill_smem_bytes<D>();
  launch_chained(train_forward_kernel<D>, dim3(grid), dim3(kThreads), smem, stream, b, qkv, heads,
                 out, lse, attn::softmax_scale_log2(D));
}

}  // namespace

// ---- kernel launcher ----

void attention_prefill(const AttentionBatch& batch, const PagedKvLayer& kv, __half* out,
                       cudaStream_t stream) {
  attn::check_attention_args(batch, kv, out, "attention_prefill");
  QG_CHECK(batch.max_new_tokens > 0, "attention_prefill: max_new_tokens is 0");
  switch (kv.head_dim) {
    case 16: launch_prefill<16>(batch, kv, out, stream); break;
    case 32: launch_prefill<32>(batch, kv, out, stream); break;
    case 64: launch_prefill<64>(batch, kv, out, stream); break;
    default: launch_prefill<128>(batch, kv, out, stream); break;
  }
}

void attention_train_forward(const __half* qkv, const TrainAttentionBatch& batch, int heads,
                             int head_dim, __half* out, float* lse, cudaStream_t stream) {
  attn::check_train_attention_args(batch, heads, head_dim, "attention_train_forward");
  QG_CHECK(qkv && out && lse, "attention_train_forward: null pointer");
  switch (head_dim) {
    case 16: launch_train_forward<16>(qkv, batch, heads, out, lse, stream); break;
    case 32: launch_train_forward<32>(qkv, batch, heads, out, lse, stream); break;
    case 64: launch_train_forward<64>(qkv, batch, heads, out, lse, stream); break;
    default: launch_train_forward<128>(qkv, batch, heads, out, lse, stream); break;
  }
}

}  // namespace qg::cuda
