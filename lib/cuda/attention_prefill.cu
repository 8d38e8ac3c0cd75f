// Step 2 of GLM attention: FlashAttention-2 style prefill/varlen kernel over the paged cache,
// and the same kernel body over packed qkv rows as the training forward
// (include/qinggeng/cuda/attention_train.h), which also saves each row's log-sum-exp.
// One thread block = (sequence, head, 64 or 128 new queries), 4 warps of 16 or 32 query rows
// (the two tile configurations below). K and V tiles of 64 keys stream through swizzled shared
// memory with cp.async; scores, the online softmax (log2 domain, fp32) and the output
// accumulators stay in registers (mma.sync m16n8k16, fp32 accumulators, ldmatrix). The GLM
// mask makes every query's visible keys a prefix [0, max(ctx, i + 1)), so the key loop simply
// stops at the tile's last visible key and only tiles crossing a row's limit are masked.
#include <atomic>

#include "cuda/attention_paths.h"
#include "cuda/attention_tiles.cuh"
#include "cuda/chained_launch.cuh"
#include "cuda/check.h"
#include "cuda/gemm_paths.h"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

/// One prefill CTA: 4 warps of kRowFrags x 16 query rows against 64-key tiles.
///   Narrow (kRowFrags 1, 64 queries): Q stays in registers as mma A fragments; one K and one V
///     buffer, the next K tile loading during softmax and P.V, the next V tile during Q.K^T.
///     48 KiB of shared memory at head_dim 128 and 169 registers: two CTAs (8 warps) an SM.
///   Wide (kRowFrags 2, 128 queries): each K or V fragment loaded from shared memory feeds twice
///     the mma of Narrow, and each K/V tile serves twice the queries. Q is re-read from shared
///     memory per 16-wide k step (its fragments would need 64 more registers beside the 128 of
///     the output accumulators), and K and V are double-buffered: tile i + 1 loads during all
///     of tile i's work. 96 KiB at head_dim 128: two CTAs an SM on sm_90 (one on sm_80 / sm_86).
template <int kHeadDim, int kRowFragsPerWarp>
struct PrefillTiles {
  static constexpr int D = kHeadDim, kRowFrags = kRowFragsPerWarp;
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * 16 * kRowFrags;  // queries per CTA
  static constexpr int kBlockN = 64;                       // keys per tile
  static constexpr int kStages = kRowFrags == 1 ? 1 : 2;   // K and V buffers
  // Narrow: no residency hint (0), which keeps it at 169 registers; Wide: two CTAs an SM.
  static constexpr int kMinBlocks = kRowFrags == 1 ? 0 : 2;
  static constexpr int kSmemBytes =
      (kBlockM + 2 * kStages * kBlockN) * D * static_cast<int>(sizeof(__half));
  static_assert(kRowFrags == 1 || kRowFrags == 2, "16 or 32 query rows per warp");
};

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
template <class Cfg, class Rows>
__device__ void load_kv_tile(__half* tile, const Rows& src, const __half* base, int first,
                             int limit) {
  constexpr int D = Cfg::D, kChunks = D / 8;
  for (int c = threadIdx.x; c < Cfg::kBlockN * kChunks; c += Cfg::kThreads) {
    const int row = c / kChunks, chunk = c % kChunks, key = first + row;
    const bool valid = key < limit;
    const __half* from = valid ? src.kv_row(base, key) + chunk * 8 : base;
    attn::cp_async_16(tile + attn::tile_offset<D>(row, chunk), from, valid);
  }
}

/// The A fragment of query rows row0 .. row0 + 15, dimensions 16 kk .. 16 kk + 15, from the
/// swizzled Q tile.
template <int D>
__device__ __forceinline__ void load_query_fragment(std::uint32_t (&a)[4], const __half* sQ,
                                                    int row0, int kk, int lane) {
  const int row = row0 + (lane % 8) + ((lane / 8) % 2) * 8;
  attn::ldmatrix_x4(a, sQ + attn::tile_offset<D>(row, kk * 2 + lane / 16));
}

/// s[i] = S = Q K^T for the warp's query fragment i (16 rows) and the kBlockN keys of sK;
/// query_fragment(a, i, kk) fills the A fragment of fragment i at k step kk. Each K fragment
/// loaded from shared memory feeds 2 kRowFrags mma.
template <class Cfg, class QueryFragment>
__device__ __forceinline__ void query_key_scores(float (&s)[Cfg::kRowFrags][Cfg::kBlockN / 8][4],
                                                 const __half* sK, int lane,
                                                 QueryFragment&& query_fragment) {
  constexpr int D = Cfg::D, kRowFrags = Cfg::kRowFrags, kKeyTiles8 = Cfg::kBlockN / 8;
#pragma unroll
  for (int i = 0; i < kRowFrags; ++i) {
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) s[i][j][0] = s[i][j][1] = s[i][j][2] = s[i][j][3] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    std::uint32_t qa[kRowFrags][4];
#pragma unroll
    for (int i = 0; i < kRowFrags; ++i) query_fragment(qa[i], i, kk);
#pragma unroll
    for (int np = 0; np < kKeyTiles8 / 2; ++np) {
      std::uint32_t kb[4];
      const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
      attn::ldmatrix_x4(kb, sK + attn::tile_offset<D>(key, kk * 2 + (lane / 8) % 2));
#pragma unroll
      for (int i = 0; i < kRowFrags; ++i) attn::mma_16816_pair(s[i], np, qa[i], kb);
    }
  }
}

/// Online softmax over one key tile starting at key n0, in the log2 domain: scales the scores,
/// masks keys at or past each row's limit (only when `needs_mask`), raises the running row
/// maxima, turns s into unnormalised probabilities, and rescales the row sums and the output
/// accumulators. Row (i, h) of this thread is row g + 8 h of query fragment i; its visible keys
/// end at row_limit(i, h).
template <class Cfg, class RowLimit>
__device__ __forceinline__ void online_softmax(float (&s)[Cfg::kRowFrags][Cfg::kBlockN / 8][4],
                                               float (&o)[Cfg::kRowFrags][Cfg::D / 8][4],
                                               float (&row_max)[Cfg::kRowFrags][2],
                                               float (&row_sum)[Cfg::kRowFrags][2],
                                               RowLimit&& row_limit, int n0, int t, bool needs_mask,
                                               float scale_log2) {
  constexpr int kKeyTiles8 = Cfg::kBlockN / 8;
#pragma unroll
  for (int i = 0; i < Cfg::kRowFrags; ++i) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        // Rounded on its own (never fused with the subtraction below), so that a masked and
        // an unmasked tile give a visible score the same bits in either configuration.
        float v = __fmul_rn(s[i][j][e], scale_log2);
        if (needs_mask && key >= row_limit(i, e / 2)) v = -INFINITY;
        s[i][j][e] = v;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], v);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Key 0 is visible to every row, so after the first tile row_max is finite.
      const float new_max = fmaxf(row_max[i][r], tile_max[r]);
      alpha[r] = exp2f(row_max[i][r] - new_max);
      row_max[i][r] = new_max;
      row_sum[i][r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[i][j][e] = exp2f(s[i][j][e] - row_max[i][e / 2]);
        row_sum[i][e / 2] += s[i][j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < Cfg::D / 8; ++j) {
      o[i][j][0] *= alpha[0];
      o[i][j][1] *= alpha[0];
      o[i][j][2] *= alpha[1];
      o[i][j][3] *= alpha[1];
    }
  }
}

/// O += P V for one key tile: P's accumulator layout is exactly the A fragment layout of the
/// next mma. Each V fragment loaded from shared memory feeds 2 kRowFrags mma.
template <class Cfg>
__device__ __forceinline__ void accumulate_values(
    float (&o)[Cfg::kRowFrags][Cfg::D / 8][4],
    const float (&p)[Cfg::kRowFrags][Cfg::kBlockN / 8][4], const __half* sV, int lane) {
  constexpr int D = Cfg::D, kRowFrags = Cfg::kRowFrags;
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
    std::uint32_t pa[kRowFrags][4];
#pragma unroll
    for (int i = 0; i < kRowFrags; ++i) {
      pa[i][0] = attn::pack_half2(p[i][2 * kk][0], p[i][2 * kk][1]);
      pa[i][1] = attn::pack_half2(p[i][2 * kk][2], p[i][2 * kk][3]);
      pa[i][2] = attn::pack_half2(p[i][2 * kk + 1][0], p[i][2 * kk + 1][1]);
      pa[i][3] = attn::pack_half2(p[i][2 * kk + 1][2], p[i][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t vb[4];
      const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
      attn::ldmatrix_x4_trans(vb, sV + attn::tile_offset<D>(key, dp * 2 + lane / 16));
#pragma unroll
      for (int i = 0; i < kRowFrags; ++i) attn::mma_16816_pair(o[i], dp, pa[i], vb);
    }
  }
}

/// Softmax(q k^T) v for Cfg::kBlockM queries (from m0) of one (sequence, head); with `lse` set,
/// also the natural log-sum-exp of each query row's scaled, masked scores at
/// lse[row * lse_stride].
template <class Cfg, class Rows>
__device__ void prefill_tile(const Rows& src, int m0, float scale_log2, float* lse,
                             int lse_stride) {
  constexpr int D = Cfg::D, kRowFrags = Cfg::kRowFrags, kBlockM = Cfg::kBlockM,
                kBlockN = Cfg::kBlockN, kWarpRows = 16 * kRowFrags;
  constexpr int kChunks = D / 8, kDimSteps = D / 16, kKeyTiles8 = kBlockN / 8;
  constexpr int kKvTile = kBlockN * D;  // halves of one K or V buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* sQ = reinterpret_cast<__half*>(smem_raw);
  __half* sK = sQ + kBlockM * D;             // [kStages][kBlockN][D]
  __half* sV = sK + Cfg::kStages * kKvTile;  // [kStages][kBlockN][D]

  const int n = src.rows();
  if (m0 >= n) return;
  const int past = src.past(), ctx = src.context(), kv_len = past + n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // Keys visible to query row r (absolute index past + m0 + r) end at limit(r); the last row of
  // the tile sees the most, the first row the fewest.
  const auto limit = [&](int r) { return min(kv_len, max(ctx, past + m0 + r + 1)); };
  const int kv_end = limit(min(kBlockM, n - m0) - 1);
  const int all_visible_end = limit(0);

  for (int c = threadIdx.x; c < kBlockM * kChunks; c += Cfg::kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = m0 + row < n;
    const __half* from = valid ? src.query(m0 + row) + chunk * 8 : src.key_base();
    attn::cp_async_16(sQ + attn::tile_offset<D>(row, chunk), from, valid);
  }
  attn::cp_async_commit();
  load_kv_tile<Cfg>(sK, src, src.key_base(), 0, kv_end);
  attn::cp_async_commit();
  load_kv_tile<Cfg>(sV, src, src.value_base(), 0, kv_end);
  attn::cp_async_commit();

  float o[kRowFrags][D / 8][4];
#pragma unroll
  for (int i = 0; i < kRowFrags; ++i) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[i][j][0] = o[i][j][1] = o[i][j][2] = o[i][j][3] = 0.0f;
  }
  float row_max[kRowFrags][2], row_sum[kRowFrags][2];
  // This thread's rows: (i, h) is row g + 8 h of the warp's query fragment i.
  int my_row[kRowFrags][2], my_limit[kRowFrags][2];
#pragma unroll
  for (int i = 0; i < kRowFrags; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[i][h] = -INFINITY;
      row_sum[i][h] = 0.0f;
      my_row[i][h] = warp * kWarpRows + i * 16 + g + 8 * h;
      my_limit[i][h] = limit(my_row[i][h]);
    }
  }

  if constexpr (Cfg::kStages == 1) {
    std::uint32_t qf[kDimSteps][4];
    for (int n0 = 0; n0 < kv_end; n0 += kBlockN) {
      attn::cp_async_wait<1>();  // Q (first time) and this K tile have landed
      __syncthreads();
      if (n0 == 0) {
#pragma unroll
        for (int kk = 0; kk < kDimSteps; ++kk) {
          load_query_fragment<D>(qf[kk], sQ, warp * kWarpRows, kk, lane);
        }
      }
      float s[kRowFrags][kKeyTiles8][4];
      query_key_scores<Cfg>(s, sK, lane, [&](std::uint32_t(&a)[4], int, int kk) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = qf[kk][e];
      });
      __syncthreads();  // every warp is done with sK: start loading the next K tile
      if (n0 + kBlockN < kv_end) {
        load_kv_tile<Cfg>(sK, src, src.key_base(), n0 + kBlockN, kv_end);
      }
      attn::cp_async_commit();
      online_softmax<Cfg>(
          s, o, row_max, row_sum, [&](int i, int h) { return my_limit[i][h]; }, n0, t,
          n0 + kBlockN > all_visible_end, scale_log2);
      attn::cp_async_wait<1>();  // this V tile has landed (the next K tile may be in flight)
      __syncthreads();
      accumulate_values<Cfg>(o, s, sV, lane);
      __syncthreads();  // every warp is done with sV: start loading the next V tile
      if (n0 + kBlockN < kv_end) {
        load_kv_tile<Cfg>(sV, src, src.value_base(), n0 + kBlockN, kv_end);
      }
      attn::cp_async_commit();
    }
  } else {
    // This warp's rows: those past the sequence see nothing; the others see keys up to the
    // limit of its last valid row, and every key below the limit of its first row.
    const int warp_first = warp * kWarpRows;
    const int warp_kv_end =
        m0 + warp_first < n ? limit(min(warp_first + kWarpRows, n - m0) - 1) : 0;
    const int warp_visible_end = limit(warp_first);
    for (int n0 = 0, stage = 0; n0 < kv_end; n0 += kBlockN, stage ^= 1) {
      // Q (first time) and this K tile have landed; every warp is done with the other stage,
      // into which the next tile now loads (an empty group when there is none).
      attn::cp_async_wait<1>();
      __syncthreads();
      // The next tile's first key re-enters through an empty asm, so that its 16 copy addresses
      // per thread are recomputed per tile instead of being kept (and spilled) across the loop.
      int next = n0 + kBlockN;
      asm volatile("" : "+r"(next));
      __half* const next_k = sK + (stage ^ 1) * kKvTile;
      __half* const next_v = sV + (stage ^ 1) * kKvTile;
      if (next < kv_end) load_kv_tile<Cfg>(next_k, src, src.key_base(), next, kv_end);
      attn::cp_async_commit();
      if (next < kv_end) load_kv_tile<Cfg>(next_v, src, src.value_base(), next, kv_end);
      attn::cp_async_commit();
      // The lane index re-enters every iteration the same way: the fragment addresses derived
      // from it are recomputed (an add or two each) rather than held across the loop.
      int lane_now = lane;
      asm volatile("" : "+r"(lane_now));
      // Warp-uniform: whether any row of this warp sees a key of the tile.
      const bool active = n0 < warp_kv_end;
      float s[kRowFrags][kKeyTiles8][4];
      if (active) {
        query_key_scores<Cfg>(s, sK + stage * kKvTile, lane_now,
                              [&](std::uint32_t(&a)[4], int i, int kk) {
                                load_query_fragment<D>(a, sQ, warp_first + i * 16, kk, lane_now);
                              });
        online_softmax<Cfg>(
            s, o, row_max, row_sum, [&](int i, int h) { return limit(my_row[i][h]); }, n0, t,
            n0 + kBlockN > warp_visible_end, scale_log2);
      }
      attn::cp_async_wait<2>();  // this V tile has landed (the next K and V may be in flight)
      __syncthreads();
      if (active) accumulate_values<Cfg>(o, s, sV + stage * kKvTile, lane_now);
    }
  }
  attn::cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < kRowFrags; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[i][r] += __shfl_xor_sync(0xffffffffu, row_sum[i][r], 1);
      row_sum[i][r] += __shfl_xor_sync(0xffffffffu, row_sum[i][r], 2);
      if (m0 + my_row[i][r] >= n) continue;
      const float inv = 1.0f / row_sum[i][r];
      if (lse != nullptr && t == 0) {
        // row_max is in the log2 domain of the scaled scores: ln(sum) = ln 2 (max + log2 sum).
        lse[static_cast<std::size_t>(src.first_row() + m0 + my_row[i][r]) * lse_stride] =
            0.6931471805599453f * (row_max[i][r] + log2f(row_sum[i][r]));
      }
      __half* dst = src.result(m0 + my_row[i][r]) + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<__half2*>(dst + j * 8) =
            __floats2half2_rn(o[i][j][2 * r] * inv, o[i][j][2 * r + 1] * inv);
      }
    }
  }
}

// Query tiles run last-first: with a causal tail the last tiles see the most keys, and
// starting them first keeps the final wave short.
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    prefill_kernel(AttentionBatch b, PagedKvLayer kv, __half* out, float scale_log2) {
  const PagedRows<Cfg::D> src(b, kv, out, blockIdx.z, blockIdx.y);
  prefill_tile<Cfg>(src, (gridDim.x - 1 - blockIdx.x) * Cfg::kBlockM, scale_log2, nullptr, 0);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    train_forward_kernel(TrainAttentionBatch b, const __half* qkv, int heads, __half* out,
                         float* lse, float scale_log2) {
  chain_release();
  chain_wait();
  const PackedRows<Cfg::D> src{
      b, qkv, out, heads, static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y)};
  prefill_tile<Cfg>(src, (gridDim.x - 1 - blockIdx.x) * Cfg::kBlockM, scale_log2, lse + blockIdx.y,
                    heads);
}

// ---- host side ----

std::atomic<AttentionPrefillTiles> forced_tiles{AttentionPrefillTiles::Auto};

/// Calls launch(Cfg{}) with the tile configuration of this call (Auto is Narrow: Wide is not
/// yet timed on a GPU).
template <int D, class Launch>
void with_prefill_tiles(Launch&& launch) {
  if (forced_tiles.load() == AttentionPrefillTiles::Wide) {
    launch(PrefillTiles<D, 2>{});
  } else {
    launch(PrefillTiles<D, 1>{});
  }
}

template <class Cfg>
void launch_prefill(const AttentionBatch& b, const PagedKvLayer& kv, __half* out,
                    cudaStream_t stream) {
  const dim3 grid((b.max_new_tokens + Cfg::kBlockM - 1) / Cfg::kBlockM, kv.num_heads, b.num_seqs);
  opt_in_shared_memory(reinterpret_cast<const void*>(prefill_kernel<Cfg>), Cfg::kSmemBytes);
  prefill_kernel<Cfg><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      b, kv, out, attn::softmax_scale_log2(Cfg::D));
  QG_CUDA_CHECK(cudaGetLastError());
}

template <class Cfg>
void launch_train_forward(const __half* qkv, const TrainAttentionBatch& b, int heads, __half* out,
                          float* lse, cudaStream_t stream) {
  const dim3 grid((b.max_seq_len + Cfg::kBlockM - 1) / Cfg::kBlockM, heads, b.num_seqs);
  opt_in_shared_memory(reinterpret_cast<const void*>(train_forward_kernel<Cfg>), Cfg::kSmemBytes);
  launch_chained(train_forward_kernel<Cfg>, dim3(grid), dim3(Cfg::kThreads), Cfg::kSmemBytes,
                 stream, b, qkv, heads, out, lse, attn::softmax_scale_log2(Cfg::D));
}

template <int D>
void prefill_with_tiles(const AttentionBatch& b, const PagedKvLayer& kv, __half* out,
                        cudaStream_t stream) {
  with_prefill_tiles<D>([&](auto cfg) { launch_prefill<decltype(cfg)>(b, kv, out, stream); });
}

template <int D>
void train_forward_with_tiles(const __half* qkv, const TrainAttentionBatch& b, int heads,
                              __half* out, float* lse, cudaStream_t stream) {
  with_prefill_tiles<D>(
      [&](auto cfg) { launch_train_forward<decltype(cfg)>(qkv, b, heads, out, lse, stream); });
}

}  // namespace

// ---- kernel launchers ----

void force_attention_prefill(AttentionPrefillTiles tiles) { forced_tiles.store(tiles); }

void attention_prefill(const AttentionBatch& batch, const PagedKvLayer& kv, __half* out,
                       cudaStream_t stream) {
  attn::check_attention_args(batch, kv, out, "attention_prefill");
  QG_CHECK(batch.max_new_tokens > 0, "attention_prefill: max_new_tokens is 0");
  switch (kv.head_dim) {
    case 16:
      prefill_with_tiles<16>(batch, kv, out, stream);
      break;
    case 32:
      prefill_with_tiles<32>(batch, kv, out, stream);
      break;
    case 64:
      prefill_with_tiles<64>(batch, kv, out, stream);
      break;
    default:
      prefill_with_tiles<128>(batch, kv, out, stream);
      break;
  }
}

void attention_train_forward(const __half* qkv, const TrainAttentionBatch& batch, int heads,
                             int head_dim, __half* out, float* lse, cudaStream_t stream) {
  attn::check_train_attention_args(batch, heads, head_dim, "attention_train_forward");
  QG_CHECK(qkv && out && lse, "attention_train_forward: null pointer");
  switch (head_dim) {
    case 16:
      train_forward_with_tiles<16>(qkv, batch, heads, out, lse, stream);
      break;
    case 32:
      train_forward_with_tiles<32>(qkv, batch, heads, out, lse, stream);
      break;
    case 64:
      train_forward_with_tiles<64>(qkv, batch, heads, out, lse, stream);
      break;
    default:
      train_forward_with_tiles<128>(qkv, batch, heads, out, lse, stream);
      break;
  }
}

}  // namespace qg::cuda
