// GPU GLM attention (append + prefill + split-KV decode over the paged cache) against the CPU
// backend through tests/backend_ops.h's run_attention, on fp16-rounded inputs: mixed batches,
// cached prefixes, GLM prefix lengths 0 / 1 / n, tails crossing block boundaries, head counts
// 1..32 and every supported head_dim; decode step by step equals one prefill of the whole
// sequence; bad arguments raise qg::Error.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "attention_pins.h"
#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/cuda/kv_pool.h"
#include "qinggeng/error.h"

namespace {

using qg::cuda::AttentionSequence;
using qg::test::AttentionCase;
using qg::test::DeviceBuffer;
using qg::test::HostMatrix;

/// One sequence of a test batch: `past` tokens fed first, then `n` new ones.
struct SeqSpec {
  int past, n, ctx;
};

int device_sms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

/// GLM-like 2-D positions: inside the context position = index and block position 0; in the
/// tail position stays at ctx - 1 and block position counts up (plus an offset so large
/// angles are exercised too).
AttentionCase make_case(const SeqSpec& s, int offset) {
  AttentionCase c;
  c.past = s.past;
  c.context_length = s.ctx;
  for (int t = 0; t < s.past + s.n; ++t) {
    const bool in_ctx = t < s.ctx;
    c.positions.push_back(offset + (in_ctx ? t : std::max(s.ctx - 1, 0)));
    c.block_positions.push_back(in_ctx ? 0 : t - s.ctx + 1 + offset);
  }
  return c;
}

/// The GPU side of one sequence: its block table in the pool.
struct GpuSequence {
  AttentionCase spec;
  std::vector<int> table;
  int stored = 0;  // tokens already in the cache
};

/// Drives attention_forward like a model layer would: each call appends `count[i]` tokens of
/// sequence i (qkv rows taken from that sequence's matrix) and returns the output rows.
class GpuAttention {
 public:
  GpuAttention(int heads, int head_dim, int block_size, int num_blocks)
      : heads_(heads), head_dim_(head_dim),
        pool_(qg::cuda::KvPoolShape{1, heads, head_dim, block_size}, num_blocks),
        sms_(device_sms()) {}

  HostMatrix step(std::vector<GpuSequence>& seqs, const std::vector<HostMatrix>& qkv,
                  const std::vector<int>& count, bool allow_decode = true) {
    const int H = heads_ * head_dim_;
    std::vector<AttentionSequence> batch;
    HostMatrix rows{0, 3 * H, {}};
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      auto& s = seqs[i];
      if (count[i] == 0) continue;
      pool_.reserve(s.table, s.stored + count[i]);
      AttentionSequence a;
      a.past = s.stored;
      a.context_length = s.spec.context_length;
      a.positions.assign(s.spec.positions.begin() + s.stored,
                         s.spec.positions.begin() + s.stored + count[i]);
      a.block_positions.assign(s.spec.block_positions.begin() + s.stored,
                               s.spec.block_positions.begin() + s.stored + count[i]);
      a.block_table = &s.table;
      batch.push_back(std::move(a));
      const auto first = qkv[i].data.begin() + static_cast<std::ptrdiff_t>(s.stored) * 3 * H;
      rows.data.insert(rows.data.end(), first, first + static_cast<std::ptrdiff_t>(count[i]) * 3 * H);
      rows.rows += count[i];
      s.stored += count[i];
    }
    const qg::cuda::AttentionBatch b = meta_.build(batch, pool_.shape().block_size, nullptr);
    DeviceBuffer<__half> d_qkv(rows.data.size()), d_out(static_cast<std::size_t>(rows.rows * H));
    qg::test::upload_fp16(d_qkv, rows);
    DeviceBuffer<float> ws(qg::cuda::attention_decode_workspace_floats(b.num_seqs, heads_, head_dim_));
    qg::cuda::attention_forward(d_qkv.get(), b, pool_.layer(0), d_out.get(),
                                allow_decode ? ws.get() : nullptr, sms_, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    return qg::test::download_fp16(d_out, rows.rows, H);
  }

  qg::cuda::KvBlockPool& pool() { return pool_; }

 private:
  int heads_, head_dim_;
  qg::cuda::KvBlockPool pool_;
  qg::cuda::AttentionMetadata meta_;
  int sms_;
};

std::vector<HostMatrix> random_qkv(const std::vector<SeqSpec>& specs, int H, std::uint32_t seed) {
  std::vector<HostMatrix> qkv;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    qkv.push_back(qg::test::round_to_fp16(qg::test::random_matrix(
        specs[i].past + specs[i].n, 3 * H, seed + static_cast<std::uint32_t>(i))));
  }
  return qkv;
}

/// Runs the two-call protocol of run_attention on the CPU backend and on the GPU and returns
/// the tolerance ratio of the second call's outputs (the GPU's go to `gpu_out` when given).
double compare_with_cpu(int heads, int head_dim, int block_size, const std::vector<SeqSpec>& specs,
                        std::uint32_t seed, HostMatrix* gpu_out = nullptr) {
  const qg::model::AttentionShape shape{heads, head_dim};
  const int H = heads * head_dim;
  std::vector<AttentionCase> cases;
  for (std::size_t i = 0; i < specs.size(); ++i) cases.push_back(make_case(specs[i], 3 * static_cast<int>(i)));
  const auto qkv = random_qkv(specs, H, seed);
  auto cpu = qg::model::make_cpu_backend(2);
  const HostMatrix expect = qg::test::run_attention(*cpu, shape, cases, qkv);

  int blocks = 0;
  for (const auto& s : specs) blocks += (s.past + s.n + block_size - 1) / block_size;
  GpuAttention gpu(heads, head_dim, block_size, blocks + 3);
  std::vector<GpuSequence> seqs;
  std::vector<int> first, second;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    seqs.push_back(GpuSequence{cases[i], {}, 0});
    first.push_back(specs[i].past);
    second.push_back(specs[i].n);
  }
  if (std::any_of(first.begin(), first.end(), [](int c) { return c > 0; })) {
    gpu.step(seqs, qkv, first);
  }
  const HostMatrix got = gpu.step(seqs, qkv, second);
  REQUIRE(got.rows == expect.rows);
  if (gpu_out != nullptr) *gpu_out = got;
  return qg::test::tolerance_ratio(got, expect, 2e-3, 2e-3);
}

}  // namespace

TEST_CASE("GPU prefill attention matches the CPU backend on mixed batches") {
  struct Config {
    int heads, head_dim, block_size;
    std::vector<SeqSpec> seqs;
  };
  const std::vector<Config> configs = {
      {1, 16, 16, {{0, 1, 0}}},
      {2, 16, 16, {{0, 37, 37}, {0, 5, 1}, {0, 70, 0}}},
      {3, 32, 8, {{0, 130, 20}, {5, 70, 5}, {100, 3, 40}}},
      {4, 64, 16, {{33, 64, 0}, {64, 65, 1}, {0, 200, 150}}},
      {2, 128, 64, {{0, 129, 64}, {17, 1, 17}, {70, 66, 70}}},
      {32, 128, 16, {{0, 96, 60}, {40, 23, 40}}},
      {5, 128, 16, {{0, 64, 64}, {64, 64, 64}, {0, 63, 0}}},
      {8, 64, 64, {{200, 1, 0}, {1, 130, 1}}},
      {2, 64, 1, {{3, 20, 5}, {0, 2, 2}}},
  };
  std::uint32_t seed = 100;
  for (const auto& c : configs) {
    std::string seqs;
    for (const auto& s : c.seqs) {
      seqs += " (past " + std::to_string(s.past) + ", n " + std::to_string(s.n) + ", ctx " +
              std::to_string(s.ctx) + ")";
    }
    INFO("heads " << c.heads << ", head_dim " << c.head_dim << ", block_size " << c.block_size
                  << ", sequences" << seqs);
    // Both tile configurations of the prefill kernel, which agree bit for bit.
    std::vector<HostMatrix> outs;
    for (const auto tiles : qg::test::kPrefillTiles) {
      INFO("prefill tiles " << qg::test::prefill_tiles_name(tiles));
      const qg::test::PinnedAttentionPrefill pinned(tiles);
      outs.emplace_back();
      CHECK(compare_with_cpu(c.heads, c.head_dim, c.block_size, c.seqs, seed, &outs.back()) <= 1.0);
    }
    CHECK(outs[0].data == outs[1].data);
    ++seed;
  }
}

TEST_CASE("GPU decode matches the CPU backend and prefill of the whole sequence") {
  for (const int head_dim : {16, 32, 64, 128}) {
    INFO("head_dim " << head_dim);
    // Decode-shaped CPU comparison: one new token after caches of several lengths (the split
    // kernel's ranges end mid-block and mid-split).
    CHECK(compare_with_cpu(4, head_dim, 16, {{1, 1, 1}, {63, 1, 20}, {64, 1, 0}, {300, 1, 150}},
                           7) <= 1.0);
  }

  // Decode step by step over three sequences == one prefill per sequence of all its tokens.
  const int heads = 4, head_dim = 128, H = heads * head_dim, steps = 40;
  const std::vector<SeqSpec> prompts = {{0, 9, 9}, {0, 30, 17}, {0, 70, 70}};
  std::vector<SeqSpec> full;
  for (const auto& p : prompts) full.push_back({0, p.n + steps, p.ctx});
  const auto qkv = random_qkv(full, H, 11);
  GpuAttention whole(heads, head_dim, 16, 64), stepwise(heads, head_dim, 16, 64);
  std::vector<GpuSequence> a, b;
  std::vector<int> all, prompt_counts;
  for (std::size_t i = 0; i < full.size(); ++i) {
    a.push_back(GpuSequence{make_case(full[i], 0), {}, 0});
    b.push_back(GpuSequence{make_case(full[i], 0), {}, 0});
    all.push_back(full[i].n);
    prompt_counts.push_back(prompts[i].n);
  }
  const HostMatrix reference = whole.step(a, qkv, all, false);
  stepwise.step(b, qkv, prompt_counts);
  double worst = 0;
  for (int t = 0; t < steps; ++t) {
    const HostMatrix got = stepwise.step(b, qkv, {1, 1, 1});
    // Row of sequence i, token prompts[i].n + t, in the whole-sequence output.
    HostMatrix expect{3, H, {}};
    int row0 = 0;
    for (std::size_t i = 0; i < full.size(); ++i) {
      const auto at = reference.data.begin() + static_cast<std::ptrdiff_t>(row0 + prompts[i].n + t) * H;
      expect.data.insert(expect.data.end(), at, at + H);
      row0 += full[i].n;
    }
    worst = std::max(worst, qg::test::tolerance_ratio(got, expect, 2e-3, 2e-3));
  }
  CHECK(worst <= 1.0);
}

TEST_CASE("KV block pool hands out and takes back blocks without reallocating") {
  qg::cuda::KvBlockPool pool({2, 2, 64, 16}, 4);
  CHECK(qg::cuda::KvBlockPool::bytes_per_block(pool.shape()) == 2u * 2 * 2 * 16 * 64 * 2);
  std::vector<int> a, b;
  pool.reserve(a, 17);  // two blocks
  CHECK(a.size() == 2);
  pool.reserve(a, 32);  // still two
  CHECK(a.size() == 2);
  pool.reserve(b, 30);
  CHECK(pool.free_blocks() == 0);
  REQUIRE_THROWS_WITH(pool.reserve(b, 33), QG_CONTAINS("KV pool exhausted"));
  CHECK(b.size() == 2);  // unchanged by the failed reserve
  pool.shrink(a, 5);
  CHECK(a.size() == 1);
  CHECK(pool.free_blocks() == 1);
  pool.release(b);
  CHECK(b.empty());
  CHECK(pool.free_blocks() == 3);
  REQUIRE_THROWS_WITH(pool.layer(2), QG_CONTAINS("layer 2"));
  REQUIRE_THROWS_WITH(qg::cuda::KvBlockPool({1, 0, 64, 16}, 4), QG_CONTAINS("must all be positive"));
  REQUIRE_THROWS_WITH(qg::cuda::KvBlockPool({1, 2, 64, 12}, 4), QG_CONTAINS("not a power of two"));
}

TEST_CASE("GPU attention rejects bad batches with a message") {
  qg::cuda::KvBlockPool pool({1, 2, 64, 16}, 8);
  std::vector<int> table;
  pool.reserve(table, 20);
  qg::cuda::AttentionMetadata meta;
  AttentionSequence s;
  s.past = 10;
  s.positions = {1, 2};
  s.block_positions = {0};
  s.block_table = &table;
  REQUIRE_THROWS_WITH(meta.build({s}, 16, nullptr), QG_CONTAINS("block_positions"));
  s.block_positions = {0, 0};
  s.past = 40;
  REQUIRE_THROWS_WITH(meta.build({s}, 16, nullptr), QG_CONTAINS("block table has 2 blocks, 3 needed"));
  s.past = 10;
  s.block_table = nullptr;
  REQUIRE_THROWS_WITH(meta.build({s}, 16, nullptr), QG_CONTAINS("no block table"));
  s.block_table = &table;
  REQUIRE_THROWS_WITH(meta.build({}, 16, nullptr), QG_CONTAINS("no sequences"));
  AttentionSequence empty = s;
  empty.positions.clear();
  empty.block_positions.clear();
  REQUIRE_THROWS_WITH(meta.build({empty}, 16, nullptr), QG_CONTAINS("no new tokens"));

  const qg::cuda::AttentionBatch b = meta.build({s}, 16, nullptr);
  DeviceBuffer<__half> out(2 * 128), qkv(2 * 3 * 128);
  DeviceBuffer<float> ws(qg::cuda::attention_decode_workspace_floats(1, 2, 64));
  REQUIRE_THROWS_WITH(qg::cuda::attention_decode(b, pool.layer(0), out.get(), ws.get(), 1, nullptr),
                      QG_CONTAINS("exactly one new token"));
  qg::cuda::PagedKvLayer odd = pool.layer(0);
  odd.head_dim = 80;
  REQUIRE_THROWS_WITH(qg::cuda::attention_prefill(b, odd, out.get(), nullptr),
                      QG_CONTAINS("head_dim 80"));
  REQUIRE_THROWS_WITH(qg::cuda::attention_append(nullptr, b, pool.layer(0), out.get(), nullptr),
                      QG_CONTAINS("qkv"));
  QG_CUDA_CHECK(cudaDeviceSynchronize());
}
