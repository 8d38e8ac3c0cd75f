// GPU token sampling (see include/qinggeng/cuda/sampling.h).
//
// One 512-thread block per row. Order of the candidates is the CPU Sampler's: by scaled
// logit, descending, ties by lower index; it is encoded in a unique 64-bit key (order-
// preserving logit bits above, the complemented index below), so every cut is one key.
// Probability mass is fixed point (exp(l - max) * 2^44 as an integer): shared-memory atomics
// on integers are order-independent, so results are reproducible bit for bit, and tokens
// below 2^-44 of the top token (never drawn in practice) weigh exactly zero.
// Each search (the k-th token, the token where cumulative mass reaches top_p, the drawn token)
// walks a 2048-bucket histogram over 64 * (max - l) built in one pass; the bucket it lands in
// is gathered and ranked in shared memory. A bucket of more than 2048 tokens (a flat row, many
// exact ties) is first narrowed by 11-bit radix passes over the key.
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
  const unsigned int* seen;

  __device__ float logit(int i, float raw) const {
    float v = replaced ? (i == 5 && vocab > 5 ? 5e4f : 0.0f) : raw;
    if (penalise && (seen[i >> 5] >> (i & 31) & 1u)) v = v < 0 ? v * penalty : v / penalty;
    if (scale) v = v / temperature;
    return v == 0.0f ? 0.0f : v;  // -0 ranks equal to +0, as in the CPU's comparisons
  }

  /// Calls fn(i, raw) for every token this thread owns. Each thread issues kLoads loads
  /// before using any (16-byte ones when aligned): one block streams a whole row, and only
  /// many bytes in flight per SM hide the memory latency.
  template <typename Fn>
  __device__ void for_each(Fn fn) const {
    constexpr int kLoads = 8;
    if (vocab % 4 == 0 && (reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
      const float4* x4 = reinterpret_cast<const float4*>(x);
      const int n4 = vocab / 4;
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
          fn(4 * v, q[u].x);
          fn(4 * v + 1, q[u].y);
          fn(4 * v + 2, q[u].z);
          fn(4 * v + 3, q[u].w);
        }
      }
    } else {
      for (int base = threadIdx.x; base < vocab; base += 4 * kLoads * kThreads) {
        float q[4 * kLoads];
#pragma unroll
        for (int u = 0; u < 4 * kLoads; ++u) {
          if (base + u * kThreads < vocab) q[u] = __ldg(x + base + u * kThreads);
        }
#pragma unroll
        for (int u = 0; u < 4 * kLoads; ++u) {
          if (base + u * kThreads >= vocab) break;
          fn(base + u * kThreads, q[u]);
        }
      }
    }
  }
};

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
struct Searcher {
  const RowView& row;
  float max_logit;
  Shared& s;
  Region loaded{-1, 64, 0};

  /// The first-level histogram as find_crossing's item values.
  __device__ auto buckets() const {
    const Shared* sh = &s;
    return [sh](int j) { return sh->buckets.at(j); };
  }

  /// Calls fn(logit, key) for every token of region `r` this thread owns.
  template <typename Fn>
  __device__ void for_each_in(const Region& r, Fn fn) const {
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
    for_each_in(r, [&](float, u64 key) {
      const unsigned int at = atomicAdd(&sh.list_size, 1u);
      if (at < kListCap) sh.u.list.keys[at] = key;
    });
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
};

// ---- CUDA kernel ----

__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const float* logits, int vocab, const SamplingRow* rows, int* history,
                  int seen_words, int* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  unsigned int* seen = reinterpret_cast<unsigned int*>(smem + sizeof(Shared));
  const SamplingRow p = rows[blockIdx.x];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  RowView row{logits + static_cast<std::size_t>(blockIdx.x) * vocab,
              vocab,
              false,
              p.repetition_penalty != 1.0f && seen_words > 0,
              p.repetition_penalty,
              p.do_sample != 0,
              p.temperature,
              seen};
  if (row.penalise) {
    for (int w = threadIdx.x; w < seen_words; w += kThreads) seen[w] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < p.history_length; j += kThreads) {
      const int t = history[p.history_begin + j];
      if (t >= 0 && t < vocab) atomicOr(&seen[t >> 5], 1u << (t & 31));
    }
    __syncthreads();
  }

  // Pass 1: the maximum (first index on ties), and whether the row must be replaced.
  float best = 0;
  int best_index = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    float v = -INFINITY;
    int vi = 0x7fffffff;
    bool bad = false;
    row.for_each([&](int i, float raw) {
      bad |= !isfinite(raw);
      const float l = row.logit(i, raw);
      if (l > v || (l == v && i < vi)) {
        v = l;
        vi = i;
      }
    });
    for (int off = 16; off > 0; off /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int oi = __shfl_xor_sync(0xffffffffu, vi, off);
      if (ov > v || (ov == v && oi < vi)) {
        v = ov;
        vi = oi;
      }
    }
    if (lane == 0) {
      s.warp_best[warp] = v;
      s.warp_best_index[warp] = vi;
    }
    const bool any_bad = __syncthreads_or(bad) != 0;
    best = s.warp_best[0];
    best_index = s.warp_best_index[0];
    for (int w = 1; w < kWarps; ++w) {
      const float ov = s.warp_best[w];
      const int oi = s.warp_best_index[w];
      if (ov > best || (ov == best && oi < best_index)) {
        best = ov;
        best_index = oi;
      }
    }
    __syncthreads();
    if (!any_bad || row.replaced) break;
    row.replaced = true;
  }

  int token = best_index < vocab ? best_index : 0;
  if (p.do_sample) {
    // Pass 2: the first-level histogram.
    s.buckets.clear(kBins);
    __syncthreads();
    row.for_each([&](int i, float raw) {
      const float l = row.logit(i, raw);
      s.buckets.add(bucket_of(best, l), mass_of(best, l));
    });
    __syncthreads();
    Searcher search{row, best, s};

    // Cuts are keys: a token is kept when its key is >= cut (0 keeps every token).
    u64 cut = 0, key = 0, kept_mass = search.total_mass();
    Tally through{0, 0};
    if (p.top_k > 0 && p.top_k < vocab &&
        search.find(false, static_cast<u64>(p.top_k), key, through)) {
      cut = key;
      kept_mass = through.mass;
    }
    if (p.top_p < 1.0f) {
      // The CPU keeps the shortest prefix with (mass / kept total) >= top_p.
      const double want = ceil(static_cast<double>(p.top_p) * static_cast<double>(kept_mass));
      const u64 target = want < 1.0 ? 1ull : static_cast<u64>(want);
      if (search.find(true, target, key, through) && key > cut) {
        cut = key;
        kept_mass = through.mass;
      }
    }
    const u64 u = __umul64hi(random_bits(p.seed, p.step), kept_mass);
    if (kept_mass > 0 && search.find(true, u + 1, key, through) && key >= cut) {
      token = key_token(key);
    }
  }
  if (threadIdx.x == 0) {
    out[blockIdx.x] = token;
    if (p.append_at >= 0) history[p.append_at] = token;
  }
}

}  // namespace

// ---- kernel launcher ----

void sample_tokens(const float* logits, int num_rows, int vocab, const SamplingRow* rows,
                   int* history, bool any_penalty, int* out, cudaStream_t stream) {
  QG_CHECK(logits && rows && out, "sample_tokens: null pointer (logits, rows or out)");
  QG_CHECK(num_rows >= 0, "sample_tokens: num_rows must be >= 0, got ", num_rows);
  QG_CHECK(vocab > 0 && vocab <= kMaxSamplingVocab, "sample_tokens: vocab must be in [1, ",
           kMaxSamplingVocab, "], got ", vocab);
  if (num_rows == 0) return;
  const int seen_words = any_penalty ? (vocab + 31) / 32 : 0;
  const std::size_t smem = sizeof(Shared) + static_cast<std::size_t>(seen_words) * 4;
  QG_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  sample_kernel<<<static_cast<unsigned>(num_rows), kThreads, smem, stream>>>(
      logits, vocab, rows, history, seen_words, out);
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
  DeviceArray<int> slot_history;   // slots * capacity ids
  DeviceArray<int> given_history;  // the stateless form's histories, packed
  DeviceArray<int> host_out;       // sample_to_host's device result
};

GpuSampler::GpuSampler(int slots, int history_capacity)
    : slots_(slots), capacity_(history_capacity), buffers_(std::make_unique<Buffers>()) {
  QG_CHECK(slots > 0 && history_capacity > 0, "GpuSampler: slots (", slots,
           ") and history_capacity (", history_capacity, ") must be > 0");
  lengths_.assign(static_cast<std::size_t>(slots), 0);
  buffers_->slot_history.reserve(static_cast<std::size_t>(slots) * history_capacity);
  buffers_->rows.reserve(static_cast<std::size_t>(slots));
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
  sample_tokens(d_logits, num_rows, vocab, d_rows, history, any_penalty, d_out, stream);
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
