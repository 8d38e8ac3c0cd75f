// GPU token sampling (see include/qinggeng/cuda/sampling.h).
//
// Order of the candidates is the CPU Sampler's: by scaled logit, descending, ties by lower
// index; it is encoded in a unique 64-bit key (order-preserving logit bits above, the
// complemented index below), so every cut is one key. Probability mass is fixed point
// (exp(l - max) * 2^44 as an integer): integer sums are order-independent, so results are
// reproducible bit for bit whatever the grid, and tokens below 2^-44 of the top token (never
// drawn in practice) weigh exactly zero.
// Each search (the k-th token, the token where cumulative mass reaches top_p, the drawn token)
// walks a 2048-bucket histogram over 64 * (max - l); the bucket it lands in is gathered and
// ranked in shared memory. A bucket of more than 2048 tokens (a flat row, many exact ties) is
// first narrowed by 11-bit radix passes over the key.
//
// Two launch forms compute the same ids:
// - one block per row (`sample_rows_kernel`, no workspace): the block reads its row once for
//   the maximum, once for the histogram and once per gathered bucket;
// - a row split over several blocks (`chunk_maximum_kernel`, `chunk_histogram_kernel`,
//   `chunk_gather_kernel`, with a workspace): each block handles one chunk of the row for the
//   maximum, the histogram (summed into the row's in the workspace with global atomics) and
//   the gather of the buckets the searches will land in (predicted from the histogram alone by
//   the histogram's last block) into a candidate list; the gather's last block of each row
//   then runs the same searches as the single-block form, reading buckets from the candidate
//   list instead of the row. A bucket the prediction missed is gathered from the row by that
//   one block (slower, same result).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/check.h"
#include "qinggeng/cuda/sampling.h"
#include "qinggeng/error.h"

namespace qg::cuda {
namespace {

// 512 threads: the 128 registers each may use hold kLoads 16-byte loads in flight without
// spilling (1024 threads would be capped at 64 registers).
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;                      // histogram buckets (and radix bins)
constexpr int kListCap = 2048;                   // tokens ranked exactly in shared memory
constexpr float kBucketsPerLogit = 64.0f;        // first-level bucket width: 1/64 logit
constexpr float kMassScale = 17592186044416.0f;  // 2^44
constexpr int kRadixBits = 11;
constexpr int kItems = kBins / kThreads;  // histogram bins per thread in a scan
static_assert(kBins % kThreads == 0 && kWarps <= 32, "scan layout");

// The split form.
constexpr int kMaxSplits = 256;      // blocks per row at most
constexpr int kMinChunk = 1024;      // tokens per block at least
constexpr int kChunkAlign = 128;     // chunk starts: whole bitmap words, aligned 16-byte loads
constexpr int kCandidateCap = 4096;  // tokens of predicted buckets gathered per row

using u64 = unsigned long long;

/// A number of tokens and their fixed-point mass.
struct Tally {
  u64 count, mass;
};
__device__ Tally operator+(Tally a, Tally b) { return {a.count + b.count, a.mass + b.mass}; }
__device__ Tally operator-(Tally a, Tally b) { return {a.count - b.count, a.mass - b.mass}; }

/// Where a search stopped: the bin (or ranked token) index, what lies before it, its own tally.
struct Crossing {
  int index;
  Tally above, own;
};

/// The tokens a search is narrowed to: first-level bucket `bucket`, and when shift < 64, the
/// keys whose bits above `shift` equal `prefix`.
struct Region {
  int bucket;
  int shift;
  u64 prefix;
  __device__ bool contains(int b, u64 key) const {
    return b == bucket && (shift >= 64 || (key >> shift) == prefix);
  }
  __device__ bool operator==(const Region& o) const {
    return bucket == o.bucket && shift == o.shift && prefix == o.prefix;
  }
};

/// Token counts and fixed-point masses per bin. The 64-bit mass is kept as two 32-bit words
/// with an explicit carry: 32-bit shared atomics are native, 64-bit adds are compare-and-swap
/// loops that crawl when a flat row sends every token to one bin.
struct Bins {
  unsigned int count[kBins];
  unsigned int mass_lo[kBins];
  unsigned int mass_hi[kBins];

  __device__ void clear(int n) {
    for (int j = threadIdx.x; j < n; j += kThreads) count[j] = mass_lo[j] = mass_hi[j] = 0;
  }
  __device__ void add(int j, u64 q) {
    atomicAdd(&count[j], 1u);
    const auto lo = static_cast<unsigned int>(q);
    unsigned int hi = static_cast<unsigned int>(q >> 32);
    if (lo) {
      const unsigned int old = atomicAdd(&mass_lo[j], lo);
      if (old + lo < old) ++hi;  // the low word wrapped
    }
    if (hi) atomicAdd(&mass_hi[j], hi);
  }
  __device__ void set(int j, unsigned int c, u64 m) {
    count[j] = c;
    mass_lo[j] = static_cast<unsigned int>(m);
    mass_hi[j] = static_cast<unsigned int>(m >> 32);
  }
  __device__ Tally at(int j) const {
    return {count[j], (static_cast<u64>(mass_hi[j]) << 32) + mass_lo[j]};
  }
};

struct Shared {
  Bins buckets;
  union {
    Bins radix;
    struct {
      u64 keys[kListCap];
      u64 mass[kListCap];
    } list;
  } u;
  Tally warp_totals[kWarps];
  Tally grand_total;
  Crossing crossing;
  float warp_best[kWarps];
  int warp_best_index[kWarps];
  unsigned int list_size;
  unsigned int wanted[kBins / 32];  // split form: buckets held in the candidate list
  unsigned int ticket;              // split form: this block's arrival order in its row
};

/// One chunk's maximum, as chunk_maximum_kernel leaves it for the later passes.
struct ChunkBest {
  float value;
  int index;
  int bad;  // a non-finite input value in the chunk
};

/// The split form's per-row scratch in the workspace. Cleared by chunk_maximum_kernel on each
/// call (nothing carries over between calls).
struct RowScratch {
  u64 mass[kBins];  // the row's histogram: fixed-point mass and token count per bucket
  unsigned int count[kBins];
  u64 candidates[kCandidateCap];  // keys of the tokens in the wanted buckets, unordered
  ChunkBest chunks[kMaxSplits];
  ChunkBest replaced;               // the maximum of the replaced row (chunk 0 holds tokens 0..5)
  unsigned int wanted[kBins / 32];  // bitmap of the buckets the gather collects
  unsigned int histogram_arrivals;  // tickets: the last block of a pass finishes the row
  unsigned int gather_arrivals;
  unsigned int candidate_count;
};

// ---- device helpers ----

__device__ unsigned int order_key(float l) {
  const unsigned int u = __float_as_uint(l);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ float key_logit(u64 key) {
  const unsigned int k = static_cast<unsigned int>(key >> 32);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/// Larger key = earlier in the CPU Sampler's order; never 0 for a finite logit.
__device__ u64 token_key(float l, int i) {
  return (static_cast<u64>(order_key(l)) << 32) | (0xffffffffu - static_cast<unsigned int>(i));
}

__device__ int key_token(u64 key) {
  return static_cast<int>(0xffffffffu - static_cast<unsigned int>(key));
}

/// Monotone in l (non-increasing), so a bucket is a contiguous range of the order.
__device__ int bucket_of(float max_logit, float l) {
  const float f = (max_logit - l) * kBucketsPerLogit;
  return f < static_cast<float>(kBins - 1) ? static_cast<int>(f) : kBins - 1;
}

__device__ u64 mass_of(float max_logit, float l) {
  return __float2ull_rz(expf(l - max_logit) * kMassScale);
}

__device__ u64 mix64(u64 x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Counter-based random bits: a bijection of step for each seed, no state to carry.
__device__ u64 random_bits(u64 seed, u64 step) {
  return mix64(mix64(seed + 0x9e3779b97f4a7c15ull) + step * 0xd1b54a32d192ed03ull);
}

/// The mass the top-p cut must reach: the CPU keeps the shortest prefix with
/// (mass / kept total) >= top_p.
__device__ u64 top_p_target(float top_p, u64 kept_mass) {
  const double want = ceil(static_cast<double>(top_p) * static_cast<double>(kept_mass));
  return want < 1.0 ? 1ull : static_cast<u64>(want);
}

/// The row as the CPU Sampler sees it after its in-place edits (non-finite replacement,
/// repetition penalty, temperature), computed on the fly from the unmodified input.
struct RowView {
  const float* x;
  int vocab;
  bool replaced;  // a non-finite value was seen: all zero except token 5
  bool penalise;
  float penalty;
  bool scale;
  float temperature;
  const unsigned int* seen;  // bit i - 32 * seen_first_word: token i is in the history
  int seen_first_word;

  __device__ float logit(int i, float raw) const {
    float v = replaced ? (i == 5 && vocab > 5 ? 5e4f : 0.0f) : raw;
    if (penalise && (seen[(i >> 5) - seen_first_word] >> (i & 31) & 1u)) {
      v = v < 0 ? v * penalty : v / penalty;
    }
    if (scale) v = v / temperature;
    return v == 0.0f ? 0.0f : v;  // -0 ranks equal to +0, as in the CPU's comparisons
  }

  /// Calls fn(i, raw) for every token in [begin, end) this thread owns (begin a multiple of
  /// 4). Each thread issues kLoads loads before using any (16-byte ones when aligned): only
  /// many bytes in flight per SM hide the memory latency when one block streams a whole row.
  template <typename Fn>
  __device__ void for_each(int begin, int end, Fn fn) const {
    constexpr int kLoads = 8;
    if (vocab % 4 == 0 && (reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
      const float4* x4 = reinterpret_cast<const float4*>(x + begin);
      const int n4 = (end - begin) / 4;
      for (int base = threadIdx.x; base < n4; base += kLoads * kThreads) {
        float4 q[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          if (base + u * kThreads < n4) q[u] = __ldg(x4 + base + u * kThreads);
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int v = base + u * kThreads;
          if (v >= n4) break;
          const int i = begin + 4 * v;
          fn(i, q[u].x);
          fn(i + 1, q[u].y);
          fn(i + 2, q[u].z);
          fn(i + 3, q[u].w);
        }
      }
    } else {
      for (int base = begin + threadIdx.x; base < end; base += 4 * kLoads * kThreads) {
        float q[4 * kLoads];
#pragma unroll
        for (int u = 0; u < 4 * kLoads; ++u) {
          if (base + u * kThreads < end) q[u] = __ldg(x + base + u * kThreads);
        }
#pragma unroll
        for (int u = 0; u < 4 * kLoads; ++u) {
          if (base + u * kThreads >= end) break;
          fn(base + u * kThreads, q[u]);
        }
      }
    }
  }
  template <typename Fn>
  __device__ void for_each(Fn fn) const {
    for_each(0, vocab, fn);
  }
};

/// Builds the seen-token bitmap of tokens [begin, end) (begin a multiple of 32) in `seen` and
/// points `row` at it. Block-wide (contains barriers).
__device__ void build_seen(RowView& row, const SamplingRow& p, const int* history, int begin,
                           int end, unsigned int* seen) {
  if (!row.penalise) return;
  const int first = begin >> 5, words = ((end + 31) >> 5) - first;
  __syncthreads();  // the bitmap may still be read by a previous pass
  for (int w = threadIdx.x; w < words; w += kThreads) seen[w] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < p.history_length; j += kThreads) {
    const int t = history[p.history_begin + j];
    if (t >= begin && t < end) atomicOr(&seen[(t >> 5) - first], 1u << (t & 31));
  }
  __syncthreads();
  row.seen = seen;
  row.seen_first_word = first;
}

__device__ RowView make_row_view(const float* logits, int vocab, const SamplingRow& p,
                                 bool penalties) {
  return RowView{logits,
                 vocab,
                 false,
                 p.repetition_penalty != 1.0f && penalties,
                 p.repetition_penalty,
                 p.do_sample != 0,
                 p.temperature,
                 nullptr,
                 0};
}

/// A maximum with its index (first on ties) and whether a non-finite input was seen.
struct Best {
  float value;
  int index;
  bool bad;
};

__device__ void keep_better(float& v, int& vi, float ov, int oi) {
  if (ov > v || (ov == v && oi < vi)) {
    v = ov;
    vi = oi;
  }
}

/// The block's best of every thread's (v, vi, bad). Uniform result.
__device__ Best block_best(float v, int vi, bool bad, Shared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off /= 2) {
    keep_better(v, vi, __shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, vi, off));
  }
  __syncthreads();  // warp_best may still be read by a previous call
  if (lane == 0) {
    s.warp_best[warp] = v;
    s.warp_best_index[warp] = vi;
  }
  const bool any_bad = __syncthreads_or(bad) != 0;
  Best best{s.warp_best[0], s.warp_best_index[0], any_bad};
  for (int w = 1; w < kWarps; ++w)
    keep_better(best.value, best.index, s.warp_best[w], s.warp_best_index[w]);
  return best;
}

/// Maximum of the row's tokens [begin, end).
__device__ Best range_best(const RowView& row, int begin, int end, Shared& s) {
  float v = -INFINITY;
  int vi = 0x7fffffff;
  bool bad = false;
  row.for_each(begin, end, [&](int i, float raw) {
    bad |= !isfinite(raw);
    keep_better(v, vi, row.logit(i, raw), i);
  });
  return block_best(v, vi, bad, s);
}

/// Maximum of the replaced row (all zero except token 5): only tokens 0..5 can hold it.
__device__ Best replaced_best(RowView row) {
  row.replaced = true;
  float v = -INFINITY;
  int vi = 0x7fffffff;
  for (int i = 0; i < row.vocab && i < 6; ++i) keep_better(v, vi, row.logit(i, 0.0f), i);
  return Best{v, vi, true};
}

/// Exclusive prefix sum of one Tally per thread, in thread order; also sets s.grand_total.
__device__ Tally block_exclusive_scan(Tally v, Shared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Tally incl = v;
  for (int off = 1; off < 32; off *= 2) {
    const u64 c = __shfl_up_sync(0xffffffffu, incl.count, off);
    const u64 m = __shfl_up_sync(0xffffffffu, incl.mass, off);
    if (lane >= off) incl = incl + Tally{c, m};
  }
  if (lane == 31) s.warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const Tally own = lane < kWarps ? s.warp_totals[lane] : Tally{0, 0};
    Tally t = own;
    for (int off = 1; off < 32; off *= 2) {
      const u64 c = __shfl_up_sync(0xffffffffu, t.count, off);
      const u64 m = __shfl_up_sync(0xffffffffu, t.mass, off);
      if (lane >= off) t = t + Tally{c, m};
    }
    if (lane < kWarps) s.warp_totals[lane] = t - own;
    if (lane == 31) s.grand_total = t;
  }
  __syncthreads();
  return s.warp_totals[warp] + (incl - v);
}

/// The first of `n` (<= kBins) items, in order, at which base + the running total (of mass,
/// or of count) reaches `target`; index -1 when it never does. Uniform result.
template <typename Values>
__device__ Crossing find_crossing(int n, Values values, bool by_mass, u64 target, Tally base,
                                  Shared& s) {
  __syncthreads();  // s.crossing / s.warp_totals may still be read from the previous call
  const int first = threadIdx.x * kItems;
  Tally v[kItems], sum{0, 0};
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    v[k] = first + k < n ? values(first + k) : Tally{0, 0};
    sum = sum + v[k];
  }
  if (threadIdx.x == 0) s.crossing.index = -1;
  Tally run = base + block_exclusive_scan(sum, s);
  auto pick = [by_mass](Tally t) { return by_mass ? t.mass : t.count; };
  if (pick(run) < target && pick(run) + pick(sum) >= target) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (pick(run) + pick(v[k]) >= target) {
        s.crossing = Crossing{first + k, run, v[k]};
        break;
      }
      run = run + v[k];
    }
  }
  __syncthreads();
  return s.crossing;
}

/// Per-row search state: the row, its maximum, and which region the ranked list holds.
/// In the split form, buckets marked in s.wanted are read from the candidate list, and the
/// row's seen bitmap covers only the block's chunk until a search needs the whole row.
struct Searcher {
  RowView& row;
  float max_logit;
  Shared& s;
  const SamplingRow& params;
  const int* history;
  unsigned int* seen;     // room for the whole row's bitmap
  bool seen_covers_row;   // false while row.seen holds only the block's chunk
  const u64* candidates;  // null in the single-block form
  int candidate_count;
  Region loaded{-1, 64, 0};

  /// The first-level histogram as find_crossing's item values.
  __device__ auto buckets() const {
    const Shared* sh = &s;
    return [sh](int j) { return sh->buckets.at(j); };
  }

  /// Makes the seen bitmap cover the whole row (before a scan of the row).
  __device__ void whole_row_seen() {
    if (!seen_covers_row) build_seen(row, params, history, 0, row.vocab, seen);
    seen_covers_row = true;
  }

  /// Calls fn(logit, key) for every token of region `r` this thread owns.
  template <typename Fn>
  __device__ void for_each_in(const Region& r, Fn fn) {
    whole_row_seen();
    const float m = max_logit;
    const RowView& v = row;
    v.for_each([&](int i, float raw) {
      const float l = v.logit(i, raw);
      const u64 key = token_key(l, i);
      if (r.contains(bucket_of(m, l), key)) fn(l, key);
    });
  }

  /// One radix pass over the tokens of `r`: picks the next 11 (last: 9) key bits.
  __device__ bool narrow(Region& r, bool by_mass, u64 target, Tally& above, u64& count) {
    const int top = r.shift >= 64 ? 64 : r.shift;
    const int next = top - kRadixBits > 0 ? top - kRadixBits : 0;
    const int bins = 1 << (top - next);
    const u64 mask = static_cast<u64>(bins - 1);
    loaded.bucket = -1;  // the radix bins overwrite the ranked list
    __syncthreads();
    s.u.radix.clear(bins);
    __syncthreads();
    Shared& sh = s;
    const float m = max_logit;
    for_each_in(r, [&](float l, u64 key) {
      const int j = static_cast<int>(mask - ((key >> next) & mask));
      sh.u.radix.add(j, mass_of(m, l));
    });
    __syncthreads();
    const Crossing c = find_crossing(
        bins, [&](int j) { return sh.u.radix.at(j); }, by_mass, target, above, s);
    if (c.index < 0) return false;
    r.prefix = (r.shift >= 64 ? 0 : r.prefix << (top - next)) | (mask - static_cast<u64>(c.index));
    r.shift = next;
    above = c.above;
    count = c.own.count;
    return true;
  }

  /// Gathers the tokens of `r` (at most kListCap) into the list, sorted by key descending,
  /// with their masses.
  __device__ int gather(const Region& r) {
    __syncthreads();
    if (threadIdx.x == 0) s.list_size = 0;
    __syncthreads();
    const float m = max_logit;
    Shared& sh = s;
    auto append = [&](u64 key) {
      const unsigned int at = atomicAdd(&sh.list_size, 1u);
      if (at < kListCap) sh.u.list.keys[at] = key;
    };
    if (candidates && r.shift >= 64 && (s.wanted[r.bucket >> 5] >> (r.bucket & 31) & 1u)) {
      for (int j = threadIdx.x; j < candidate_count; j += kThreads) {
        const u64 key = __ldcg(candidates + j);
        if (bucket_of(m, key_logit(key)) == r.bucket) append(key);
      }
    } else {
      for_each_in(r, [&](float, u64 key) { append(key); });
    }
    __syncthreads();
    const int n = s.list_size < kListCap ? static_cast<int>(s.list_size) : kListCap;
    // Keys are unique, so each one's rank is its place; the mass array holds the sorted keys
    // for a moment.
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const u64 key = s.u.list.keys[j];
      int rank = 0;
      for (int k = 0; k < n; ++k) rank += s.u.list.keys[k] > key;
      s.u.list.mass[rank] = key;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const u64 key = s.u.list.mass[j];
      s.u.list.keys[j] = key;
      s.u.list.mass[j] = mass_of(m, key_logit(key));
    }
    __syncthreads();
    loaded = r;
    return n;
  }

  /// Fixed-point mass of the whole row.
  __device__ u64 total_mass() {
    find_crossing(kBins, buckets(), true, ~0ull, Tally{0, 0}, s);
    return s.grand_total.mass;
  }

  /// The key of the token at which the running count or mass, in CPU order, reaches target;
  /// `through` gets the tally of every token up to and including it.
  __device__ bool find(bool by_mass, u64 target, u64& key, Tally& through) {
    const Crossing first = find_crossing(kBins, buckets(), by_mass, target, Tally{0, 0}, s);
    if (first.index < 0) return false;
    Region r{first.index, 64, 0};
    Tally above = first.above;
    u64 count = first.own.count;
    while (count > kListCap) {
      if (!narrow(r, by_mass, target, above, count)) return false;
    }
    int n = static_cast<int>(count);
    if (!(loaded == r)) n = gather(r);
    Shared& sh = s;
    const Crossing c = find_crossing(
        n,
        [&](int j) {
          return Tally{1, sh.u.list.mass[j]};
        },
        by_mass, target, above, s);
    if (c.index < 0) return false;
    key = s.u.list.keys[c.index];
    through = c.above + c.own;
    return true;
  }

  /// The sampled token of a row whose histogram is in s.buckets: top-k cut, top-p cut, draw.
  /// `fallback` (the argmax) when no token can be drawn.
  __device__ int draw(int fallback) {
    const SamplingRow& p = params;
    // Cuts are keys: a token is kept when its key is >= cut (0 keeps every token).
    u64 cut = 0, key = 0, kept_mass = total_mass();
    Tally through{0, 0};
    if (p.top_k > 0 && p.top_k < row.vocab &&
        find(false, static_cast<u64>(p.top_k), key, through)) {
      cut = key;
      kept_mass = through.mass;
    }
    if (p.top_p < 1.0f) {
      if (find(true, top_p_target(p.top_p, kept_mass), key, through) && key > cut) {
        cut = key;
        kept_mass = through.mass;
      }
    }
    const u64 u = __umul64hi(random_bits(p.seed, p.step), kept_mass);
    if (kept_mass > 0 && find(true, u + 1, key, through) && key >= cut) return key_token(key);
    return fallback;
  }
};

__device__ void write_token(const SamplingRow& p, int* history, int* out, int row, int token) {
  if (threadIdx.x == 0) {
    out[row] = token;
    if (p.append_at >= 0) history[p.append_at] = token;
  }
}

// ---- one block per row ----

__global__ void __launch_bounds__(kThreads, 1)
    sample_rows_kernel(const float* logits, int vocab, const SamplingRow* rows, int* history,
                       bool penalties, int* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  unsigned int* seen = reinterpret_cast<unsigned int*>(smem + sizeof(Shared));
  const SamplingRow p = rows[blockIdx.x];
  RowView row =
      make_row_view(logits + static_cast<std::size_t>(blockIdx.x) * vocab, vocab, p, penalties);
  build_seen(row, p, history, 0, vocab, seen);

  // Pass 1: the maximum (first index on ties), and whether the row must be replaced.
  Best best = range_best(row, 0, vocab, s);
  if (best.bad) {
    row.replaced = true;
    best = replaced_best(row);
  }
  int token = best.index < vocab ? best.index : 0;
  if (p.do_sample) {
    // Pass 2: the first-level histogram; then the searches.
    __syncthreads();
    s.buckets.clear(kBins);
    __syncthreads();
    row.for_each([&](int i, float raw) {
      const float l = row.logit(i, raw);
      s.buckets.add(bucket_of(best.value, l), mass_of(best.value, l));
    });
    __syncthreads();
    Searcher search{row, best.value, s, p, history, seen, true, nullptr, 0};
    token = search.draw(token);
  }
  write_token(p, history, out, blockIdx.x, token);
}

// ---- a row split over several blocks ----
// Grid (splits, rows): block (c, r) owns tokens [c * chunk, min((c + 1) * chunk, vocab)) of
// row r.

struct Chunk {
  int begin, end;
};

__device__ Chunk my_chunk(int chunk, int vocab) {
  const int begin = static_cast<int>(blockIdx.x) * chunk;
  return Chunk{begin, min(begin + chunk, vocab)};
}

/// The row's maximum from its chunks' (uniform), the replaced row's when a chunk saw a
/// non-finite value (then `row` is switched to the replaced view).
__device__ Best row_best(const RowScratch& scratch, int splits, RowView& row, Shared& s) {
  float v = -INFINITY;
  int vi = 0x7fffffff;
  bool bad = false;
  for (int c = threadIdx.x; c < splits; c += kThreads) {
    const ChunkBest b = scratch.chunks[c];
    keep_better(v, vi, b.value, b.index);
    bad |= b.bad != 0;
  }
  Best best = block_best(v, vi, bad, s);
  if (best.bad) {
    row.replaced = true;
    best = Best{scratch.replaced.value, scratch.replaced.index, true};
  }
  return best;
}

/// True in the block that arrives last at `arrivals` (after making its global writes visible).
__device__ bool last_to_arrive(unsigned int* arrivals, int splits, Shared& s) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s.ticket = atomicAdd(arrivals, 1u);
  __syncthreads();
  return s.ticket == static_cast<unsigned int>(splits - 1);
}

/// Copies the row's histogram from the workspace into s.buckets.
__device__ void load_histogram(const RowScratch& scratch, Shared& s) {
  for (int j = threadIdx.x; j < kBins; j += kThreads) {
    s.buckets.set(j, __ldcg(&scratch.count[j]), __ldcg(&scratch.mass[j]));
  }
  __syncthreads();
}

/// Pass 1: each chunk's maximum; also clears the row's scratch for this call.
__global__ void __launch_bounds__(kThreads)
    chunk_maximum_kernel(const float* logits, int vocab, const SamplingRow* rows,
                         const int* history, bool penalties, int chunk, int splits,
                         RowScratch* scratch_rows) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  unsigned int* seen = reinterpret_cast<unsigned int*>(smem + sizeof(Shared));
  RowScratch& scratch = scratch_rows[blockIdx.y];
  const SamplingRow p = rows[blockIdx.y];
  const Chunk c = my_chunk(chunk, vocab);
  RowView row =
      make_row_view(logits + static_cast<std::size_t>(blockIdx.y) * vocab, vocab, p, penalties);
  build_seen(row, p, history, c.begin, c.end, seen);
  const Best best = range_best(row, c.begin, c.end, s);
  if (threadIdx.x == 0) scratch.chunks[blockIdx.x] = ChunkBest{best.value, best.index, best.bad};
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const Best r = replaced_best(row);  // needs the bitmap of tokens 0..5: this chunk's
    scratch.replaced = ChunkBest{r.value, r.index, 1};
  }

  const int bin_begin = static_cast<int>(blockIdx.x) * kBins / splits;
  const int bin_end = (static_cast<int>(blockIdx.x) + 1) * kBins / splits;
  for (int j = bin_begin + threadIdx.x; j < bin_end; j += kThreads) {
    scratch.count[j] = 0;
    scratch.mass[j] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scratch.histogram_arrivals = 0;
    scratch.gather_arrivals = 0;
    scratch.candidate_count = 0;
  }
}

/// Tokens in the buckets [lo, hi] that gather() would take from the candidate list (those of
/// at most kListCap tokens). Uniform.
__device__ u64 listable_tokens(int lo, int hi, Shared& s) {
  u64 sum = 0;
  for (int k = 0; k < kItems; ++k) {
    const int j = threadIdx.x * kItems + k;
    const unsigned int n = s.buckets.count[j];
    if (j >= lo && j <= hi && n <= kListCap) sum += n;
  }
  __syncthreads();  // s.grand_total may still be read from the previous call
  block_exclusive_scan(Tally{sum, 0}, s);
  return s.grand_total.count;
}

/// Predicts, from the row's histogram in s.buckets alone, the buckets the searches of
/// Searcher::draw will gather: the top_k-th token's, the range the top-p cut can fall in for
/// any top-k kept mass the top-k bucket allows, the range the drawn token can fall in for any
/// kept mass the top-p range allows. Marks them in `wanted` as far as kCandidateCap allows
/// (in that order). A missed bucket costs a scan of the row, never a different result.
__device__ void plan_candidates(const SamplingRow& p, int vocab, Shared& s, unsigned int* wanted) {
  const Shared* sh = &s;
  auto buckets = [sh](int j) { return sh->buckets.at(j); };
  int lo[3], hi[3], ranges = 0;
  find_crossing(kBins, buckets, true, ~0ull, Tally{0, 0}, s);
  u64 kept_lo = s.grand_total.mass, kept_hi = kept_lo;
  if (p.top_k > 0 && p.top_k < vocab) {
    const Crossing c =
        find_crossing(kBins, buckets, false, static_cast<u64>(p.top_k), Tally{0, 0}, s);
    if (c.index >= 0) {
      lo[ranges] = hi[ranges] = c.index;
      ++ranges;
      kept_lo = c.above.mass;
      kept_hi = c.above.mass + c.own.mass;
    }
  }
  if (p.top_p < 1.0f) {
    const u64 target_lo = top_p_target(p.top_p, kept_lo);
    const u64 target_hi = top_p_target(p.top_p, kept_hi);
    const Crossing a = find_crossing(kBins, buckets, true, target_lo, Tally{0, 0}, s);
    const Crossing b = find_crossing(kBins, buckets, true, target_hi, Tally{0, 0}, s);
    if (a.index >= 0 && b.index >= 0) {
      lo[ranges] = a.index;
      hi[ranges] = b.index;
      ++ranges;
      // The cut token's running mass is at least its target and at most its bucket's.
      kept_lo = target_lo;
      kept_hi = min(kept_hi, b.above.mass + b.own.mass);
    }
  }
  const u64 bits = random_bits(p.seed, p.step);
  const Crossing a =
      find_crossing(kBins, buckets, true, __umul64hi(bits, kept_lo) + 1, Tally{0, 0}, s);
  const Crossing b =
      find_crossing(kBins, buckets, true, __umul64hi(bits, kept_hi) + 1, Tally{0, 0}, s);
  if (a.index >= 0 && b.index >= 0) {
    lo[ranges] = a.index;
    hi[ranges] = b.index;
    ++ranges;
  }
  bool take[3] = {false, false, false};
  u64 taken = 0;
  for (int k = 0; k < ranges; ++k) {
    const u64 n = listable_tokens(lo[k], hi[k], s);
    if (taken + n <= kCandidateCap) {
      take[k] = true;
      taken += n;
    }
  }
  // Bin j = threadIdx.x + m * kThreads: a warp's ballot is one bitmap word.
  for (int m = 0; m < kItems; ++m) {
    const int j = static_cast<int>(threadIdx.x) + m * kThreads;
    bool want = false;
    for (int k = 0; k < ranges; ++k) want |= take[k] && j >= lo[k] && j <= hi[k];
    want &= s.buckets.count[j] <= kListCap;
    const unsigned int word = __ballot_sync(0xffffffffu, want);
    if ((threadIdx.x & 31) == 0) wanted[j >> 5] = word;
  }
}

/// Pass 2: each chunk's histogram, added into the row's; the last block of the row plans the
/// candidate buckets.
__global__ void __launch_bounds__(kThreads)
    chunk_histogram_kernel(const float* logits, int vocab, const SamplingRow* rows,
                           const int* history, bool penalties, int chunk, int splits,
                           RowScratch* scratch_rows) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  unsigned int* seen = reinterpret_cast<unsigned int*>(smem + sizeof(Shared));
  const SamplingRow p = rows[blockIdx.y];
  if (!p.do_sample) return;
  RowScratch& scratch = scratch_rows[blockIdx.y];
  const Chunk c = my_chunk(chunk, vocab);
  RowView row =
      make_row_view(logits + static_cast<std::size_t>(blockIdx.y) * vocab, vocab, p, penalties);
  const Best best = row_best(scratch, splits, row, s);
  build_seen(row, p, history, c.begin, c.end, seen);
  s.buckets.clear(kBins);
  __syncthreads();
  row.for_each(c.begin, c.end, [&](int i, float raw) {
    const float l = row.logit(i, raw);
    s.buckets.add(bucket_of(best.value, l), mass_of(best.value, l));
  });
  __syncthreads();
  for (int j = threadIdx.x; j < kBins; j += kThreads) {
    const Tally t = s.buckets.at(j);
    if (t.count) {
      atomicAdd(&scratch.count[j], static_cast<unsigned int>(t.count));
      if (t.mass) atomicAdd(&scratch.mass[j], t.mass);
    }
  }
  if (!last_to_arrive(&scratch.histogram_arrivals, splits, s)) return;
  load_histogram(scratch, s);
  plan_candidates(p, vocab, s, scratch.wanted);
}

/// Pass 3: each chunk's tokens in the wanted buckets, appended to the row's candidate list;
/// the last block of the row runs the searches and writes the token. Greedy rows: the argmax.
__global__ void __launch_bounds__(kThreads, 1)
    chunk_gather_kernel(const float* logits, int vocab, const SamplingRow* rows, int* history,
                        bool penalties, int chunk, int splits, RowScratch* scratch_rows, int* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  unsigned int* seen = reinterpret_cast<unsigned int*>(smem + sizeof(Shared));
  const SamplingRow p = rows[blockIdx.y];
  if (!p.do_sample && blockIdx.x != 0) return;
  RowScratch& scratch = scratch_rows[blockIdx.y];
  RowView row =
      make_row_view(logits + static_cast<std::size_t>(blockIdx.y) * vocab, vocab, p, penalties);
  const Best best = row_best(scratch, splits, row, s);
  const int argmax = best.index < vocab ? best.index : 0;
  if (!p.do_sample) {
    write_token(p, history, out, blockIdx.y, argmax);
    return;
  }
  const Chunk c = my_chunk(chunk, vocab);
  build_seen(row, p, history, c.begin, c.end, seen);
  for (int w = threadIdx.x; w < kBins / 32; w += kThreads) s.wanted[w] = __ldcg(&scratch.wanted[w]);
  __syncthreads();
  row.for_each(c.begin, c.end, [&](int i, float raw) {
    const float l = row.logit(i, raw);
    const int b = bucket_of(best.value, l);
    if (s.wanted[b >> 5] >> (b & 31) & 1u) {
      const unsigned int at = atomicAdd(&scratch.candidate_count, 1u);
      if (at < kCandidateCap) scratch.candidates[at] = token_key(l, i);
    }
  });
  if (!last_to_arrive(&scratch.gather_arrivals, splits, s)) return;
  load_histogram(scratch, s);
  const unsigned int found = __ldcg(&scratch.candidate_count);
  // The plan keeps the list within its capacity; should it not, every bucket comes from the row.
  const bool usable = found <= kCandidateCap;
  Searcher search{row,
                  best.value,
                  s,
                  p,
                  history,
                  seen,
                  false,
                  usable ? scratch.candidates : nullptr,
                  usable ? static_cast<int>(found) : 0};
  write_token(p, history, out, blockIdx.y, search.draw(argmax));
}

/// Blocks per row for the split form: enough to fill the device once, chunks of at least
/// kMinChunk tokens, at most kMaxSplits.
struct SplitPlan {
  int splits, chunk;
};

SplitPlan plan_splits(int num_rows, int vocab, int num_sms) {
  int splits = std::max(1, num_sms / num_rows);
  splits = std::min({splits, (vocab + kMinChunk - 1) / kMinChunk, kMaxSplits});
  int chunk = (vocab + splits - 1) / splits;
  chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  return SplitPlan{(vocab + chunk - 1) / chunk, chunk};
}

void check_launch_args(const char* what, const float* logits, int num_rows, int vocab,
                       const SamplingRow* rows, const int* out) {
  QG_CHECK(logits && rows && out, what, ": null pointer (logits, rows or out)");
  QG_CHECK(num_rows >= 0, what, ": num_rows must be >= 0, got ", num_rows);
  QG_CHECK(vocab > 0 && vocab <= kMaxSamplingVocab, what, ": vocab must be in [1, ",
           kMaxSamplingVocab, "], got ", vocab);
}

template <typename Kernel>
void allow_shared(Kernel kernel, std::size_t bytes) {
  QG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(bytes)));
}

}  // namespace

// ---- kernel launchers ----

std::size_t sampling_workspace_bytes(int num_rows) {
  return static_cast<std::size_t>(std::max(num_rows, 0)) * sizeof(RowScratch);
}

void sample_tokens(const float* logits, int num_rows, int vocab, const SamplingRow* rows,
                   int* history, bool any_penalty, int* out, cudaStream_t stream) {
  check_launch_args("sample_tokens", logits, num_rows, vocab, rows, out);
  if (num_rows == 0) return;
  const int seen_words = any_penalty ? (vocab + 31) / 32 : 0;
  const std::size_t smem = sizeof(Shared) + static_cast<std::size_t>(seen_words) * 4;
  allow_shared(sample_rows_kernel, smem);
  sample_rows_kernel<<<static_cast<unsigned>(num_rows), kThreads, smem, stream>>>(
      logits, vocab, rows, history, any_penalty, out);
  QG_CUDA_CHECK(cudaGetLastError());
}

void sample_tokens(const float* logits, int num_rows, int vocab, const SamplingRow* rows,
                   int* history, bool any_penalty, int* out, void* workspace,
                   std::size_t workspace_bytes, int num_sms, cudaStream_t stream) {
  check_launch_args("sample_tokens", logits, num_rows, vocab, rows, out);
  QG_CHECK(num_rows <= 65535, "sample_tokens: at most 65535 rows per call with a workspace, got ",
           num_rows);
  if (num_rows == 0) return;
  QG_CHECK(workspace && workspace_bytes >= sampling_workspace_bytes(num_rows),
           "sample_tokens: workspace of ", workspace_bytes, " bytes at ", workspace,
           ", need sampling_workspace_bytes(", num_rows,
           ") = ", sampling_workspace_bytes(num_rows));
  QG_CHECK((reinterpret_cast<std::uintptr_t>(workspace) & 15) == 0,
           "sample_tokens: workspace must be 16-byte aligned");
  const SplitPlan plan = plan_splits(num_rows, vocab, num_sms);
  auto* scratch = static_cast<RowScratch*>(workspace);
  const std::size_t chunk_seen = any_penalty ? static_cast<std::size_t>(plan.chunk / 32) * 4 : 0;
  const std::size_t row_seen =
      any_penalty ? std::max(chunk_seen, static_cast<std::size_t>((vocab + 31) / 32) * 4) : 0;
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(num_rows));
  allow_shared(chunk_maximum_kernel, sizeof(Shared) + chunk_seen);
  allow_shared(chunk_histogram_kernel, sizeof(Shared) + chunk_seen);
  allow_shared(chunk_gather_kernel, sizeof(Shared) + row_seen);
  chunk_maximum_kernel<<<grid, kThreads, sizeof(Shared) + chunk_seen, stream>>>(
      logits, vocab, rows, history, any_penalty, plan.chunk, plan.splits, scratch);
  QG_CUDA_CHECK(cudaGetLastError());
  chunk_histogram_kernel<<<grid, kThreads, sizeof(Shared) + chunk_seen, stream>>>(
      logits, vocab, rows, history, any_penalty, plan.chunk, plan.splits, scratch);
  QG_CUDA_CHECK(cudaGetLastError());
  chunk_gather_kernel<<<grid, kThreads, sizeof(Shared) + row_seen, stream>>>(
      logits, vocab, rows, history, any_penalty, plan.chunk, plan.splits, scratch, out);
  QG_CUDA_CHECK(cudaGetLastError());
}

// ---- GpuSampler ----

namespace {

/// A growable device array; growing discards the contents (cudaFree waits for the device).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* reserve(std::size_t count) {
    if (count > size_) {
      if (ptr_) QG_CUDA_CHECK(cudaFree(ptr_));
      ptr_ = nullptr;
      size_ = 0;
      QG_CUDA_CHECK(cudaMalloc(&ptr_, count * sizeof(T)));
      size_ = count;
    }
    return ptr_;
  }
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace

struct GpuSampler::Buffers {
  DeviceArray<SamplingRow> rows;
  DeviceArray<int> slot_history;         // slots * capacity ids
  DeviceArray<int> given_history;        // the stateless form's histories, packed
  DeviceArray<int> host_out;             // sample_to_host's device result
  DeviceArray<unsigned char> workspace;  // the split form's per-row scratch
};

GpuSampler::GpuSampler(int slots, int history_capacity)
    : slots_(slots),
      capacity_(history_capacity),
      num_sms_(1),
      buffers_(std::make_unique<Buffers>()) {
  QG_CHECK(slots > 0 && history_capacity > 0, "GpuSampler: slots (", slots,
           ") and history_capacity (", history_capacity, ") must be > 0");
  lengths_.assign(static_cast<std::size_t>(slots), 0);
  buffers_->slot_history.reserve(static_cast<std::size_t>(slots) * history_capacity);
  buffers_->rows.reserve(static_cast<std::size_t>(slots));
  buffers_->workspace.reserve(sampling_workspace_bytes(slots));
  int device = 0;
  QG_CUDA_CHECK(cudaGetDevice(&device));
  QG_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
}

GpuSampler::~GpuSampler() = default;

void GpuSampler::reset_history(int slot, const std::vector<int>& tokens, cudaStream_t stream) {
  QG_CHECK(slot >= 0 && slot < slots_, "GpuSampler: slot ", slot, " out of range [0, ", slots_,
           ")");
  QG_CHECK(tokens.size() <= static_cast<std::size_t>(capacity_), "GpuSampler: ", tokens.size(),
           " history tokens exceed the capacity of ", capacity_);
  if (!tokens.empty()) {
    QG_CUDA_CHECK(cudaMemcpyAsync(
        buffers_->slot_history.get() + static_cast<std::size_t>(slot) * capacity_, tokens.data(),
        tokens.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
  }
  lengths_[static_cast<std::size_t>(slot)] = static_cast<int>(tokens.size());
}

int GpuSampler::history_length(int slot) const {
  QG_CHECK(slot >= 0 && slot < slots_, "GpuSampler: slot ", slot, " out of range [0, ", slots_,
           ")");
  return lengths_[static_cast<std::size_t>(slot)];
}

void GpuSampler::launch(const float* d_logits, int num_rows, int vocab,
                        const std::vector<engine::SamplingConfig>& configs,
                        const std::vector<std::uint64_t>& steps, std::vector<SamplingRow>& rows,
                        int* history, int* d_out, cudaStream_t stream) {
  bool any_penalty = false;
  for (int r = 0; r < num_rows; ++r) {
    const engine::SamplingConfig& c = configs[static_cast<std::size_t>(r)];
    try {
      c.validate();
    } catch (const Error& e) {
      fail("GpuSampler: row ", r, ": ", e.what());
    }
    SamplingRow& row = rows[static_cast<std::size_t>(r)];
    row.temperature = c.temperature;
    row.top_p = c.top_p;
    row.repetition_penalty = c.repetition_penalty;
    row.top_k = c.top_k;
    row.do_sample = c.do_sample ? 1 : 0;
    row.seed = c.seed;
    row.step = steps[static_cast<std::size_t>(r)];
    any_penalty = any_penalty || c.repetition_penalty != 1.0f;
  }
  SamplingRow* d_rows = buffers_->rows.reserve(rows.size());
  // From pageable memory: the call returns once `rows` is staged, so it may go out of scope.
  QG_CUDA_CHECK(cudaMemcpyAsync(d_rows, rows.data(), rows.size() * sizeof(SamplingRow),
                                cudaMemcpyHostToDevice, stream));
  // Slot rows are distinct slots, so this never grows after the constructor.
  const std::size_t workspace_bytes = sampling_workspace_bytes(num_rows);
  void* workspace = buffers_->workspace.reserve(workspace_bytes);
  sample_tokens(d_logits, num_rows, vocab, d_rows, history, any_penalty, d_out, workspace,
                workspace_bytes, num_sms_, stream);
}

void GpuSampler::sample(const float* d_logits, int num_rows, int vocab,
                        const std::vector<engine::SamplingConfig>& configs,
                        const std::vector<int>& slots, const std::vector<std::uint64_t>& steps,
                        int* d_out, cudaStream_t stream) {
  const auto n = static_cast<std::size_t>(num_rows < 0 ? 0 : num_rows);
  QG_CHECK(num_rows >= 0 && configs.size() == n && slots.size() == n && steps.size() == n,
           "GpuSampler: ", num_rows, " rows but ", configs.size(), " configs, ", slots.size(),
           " slots and ", steps.size(), " steps");
  QG_CHECK(d_logits && d_out, "GpuSampler: null pointer (logits or out)");
  if (n == 0) return;
  std::vector<char> used(static_cast<std::size_t>(slots_), 0);
  std::vector<SamplingRow> rows(n);
  for (std::size_t r = 0; r < n; ++r) {
    const int slot = slots[r];
    QG_CHECK(slot >= 0 && slot < slots_, "GpuSampler: row ", r, ": slot ", slot,
             " out of range [0, ", slots_, ")");
    QG_CHECK(!used[static_cast<std::size_t>(slot)], "GpuSampler: row ", r, ": slot ", slot,
             " used by two rows");
    used[static_cast<std::size_t>(slot)] = 1;
    const int length = lengths_[static_cast<std::size_t>(slot)];
    QG_CHECK(length < capacity_, "GpuSampler: row ", r, ": slot ", slot,
             " history is full (capacity ", capacity_, ")");
    rows[r].history_begin = slot * capacity_;
    rows[r].history_length = length;
    rows[r].append_at = rows[r].history_begin + length;
  }
  launch(d_logits, num_rows, vocab, configs, steps, rows, buffers_->slot_history.get(), d_out,
         stream);
  for (std::size_t r = 0; r < n; ++r) ++lengths_[static_cast<std::size_t>(slots[r])];
}

void GpuSampler::sample(const float* d_logits, int num_rows, int vocab,
                        const std::vector<engine::SamplingConfig>& configs,
                        const std::vector<std::vector<int>>& histories,
                        const std::vector<std::uint64_t>& steps, int* d_out, cudaStream_t stream) {
  const auto n = static_cast<std::size_t>(num_rows < 0 ? 0 : num_rows);
  QG_CHECK(num_rows >= 0 && configs.size() == n && histories.size() == n && steps.size() == n,
           "GpuSampler: ", num_rows, " rows but ", configs.size(), " configs, ", histories.size(),
           " histories and ", steps.size(), " steps");
  QG_CHECK(d_logits && d_out, "GpuSampler: null pointer (logits or out)");
  if (n == 0) return;
  std::vector<SamplingRow> rows(n);
  std::vector<int> packed;
  for (std::size_t r = 0; r < n; ++r) {
    rows[r].history_begin = static_cast<int>(packed.size());
    rows[r].history_length = static_cast<int>(histories[r].size());
    packed.insert(packed.end(), histories[r].begin(), histories[r].end());
  }
  int* d_history = nullptr;
  if (!packed.empty()) {
    d_history = buffers_->given_history.reserve(packed.size());
    QG_CUDA_CHECK(cudaMemcpyAsync(d_history, packed.data(), packed.size() * sizeof(int),
                                  cudaMemcpyHostToDevice, stream));
  }
  launch(d_logits, num_rows, vocab, configs, steps, rows, d_history, d_out, stream);
}

std::vector<int> GpuSampler::sample_to_host(const float* d_logits, int num_rows, int vocab,
                                            const std::vector<engine::SamplingConfig>& configs,
                                            const std::vector<std::vector<int>>& histories,
                                            const std::vector<std::uint64_t>& steps,
                                            cudaStream_t stream) {
  const auto n = static_cast<std::size_t>(num_rows < 0 ? 0 : num_rows);
  int* d_out = buffers_->host_out.reserve(n == 0 ? 1 : n);
  sample(d_logits, num_rows, vocab, configs, histories, steps, d_out, stream);
  std::vector<int> ids(n);
  if (n > 0) {
    QG_CUDA_CHECK(
        cudaMemcpyAsync(ids.data(), d_out, n * sizeof(int), cudaMemcpyDeviceToHost, stream));
  }
  QG_CUDA_CHECK(cudaStreamSynchronize(stream));
  return ids;
}

}  // namespace qg::cuda
