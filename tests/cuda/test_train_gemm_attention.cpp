// Training kernels against the CPU reference of include/qinggeng/train/reference_backward.h on
// fp16-rounded inputs: the backward GEMMs (dX = dY W on both kernel families, dW = dY^T X,
// the residual and accumulate epilogues), the 2-D rotary on fused qkv rows, and GLM attention
// forward (lse; both tile configurations) and backward over packed sequences (also with the
// rotary's backward fused in). (LayerNorm, gelu, embedding, LoRA and the
// cross-entropy have their own files: test_train_ops.cpp, test_lora_train.cpp,
// test_cross_entropy.cpp.) Gradients are compared by relative L2 error; bad arguments are
// refused.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_pins.h"
#include "catch.hpp"
#include "cuda/gemm_backward_paths.h"
#include "fp16_device.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_backward.h"

using namespace qg;
using test::DeviceBuffer;
using test::DeviceMatrix;
using test::HostMatrix;
using test::random_fp16;
using test::relative_l2;

namespace {

const std::uint16_t* bits(DeviceMatrix& m) {
  return reinterpret_cast<const std::uint16_t*>(m.buf.get());
}

std::vector<float> download(DeviceBuffer<float>& b) { return b.download(); }

DeviceBuffer<float> device_floats(const std::vector<float>& v) {
  DeviceBuffer<float> b(v.size());
  b.upload(v);
  return b;
}

DeviceBuffer<int> device_ints(const std::vector<int>& v) {
  DeviceBuffer<int> b(v.size());
  b.upload(v);
  return b;
}

}  // namespace

TEST_CASE("GPU backward GEMMs: dX = dY W and dW = dY^T X", "[cuda][train][gemm]") {
  struct Case {
    std::int64_t M, N, K;
  };
  for (const Case c : {Case{1, 8, 8}, Case{7, 40, 24}, Case{33, 136, 264}, Case{1000, 264, 520},
                       Case{300, 4096, 1024}, Case{77, 192, 136}}) {
    INFO("M " << c.M << " N " << c.N << " K " << c.K);
    // NN: Y[M, N] = X[M, K] W[K, N] (+ residual * alpha).
    const HostMatrix x = random_fp16(c.M, c.K, 11), w = random_fp16(c.K, c.N, 12, 0.1f),
                     res = random_fp16(c.M, c.N, 13);
    std::vector<float> expect(c.M * c.N), with_res(c.M * c.N);
    for (std::int64_t m = 0; m < c.M; ++m) {
      for (std::int64_t n = 0; n < c.N; ++n) {
        double acc = 0;
        for (std::int64_t k = 0; k < c.K; ++k) acc += double(x.at(m, k)) * w.at(k, n);
        expect[m * c.N + n] = static_cast<float>(acc);
        with_res[m * c.N + n] = static_cast<float>(acc + 1.5 * res.at(m, n));
      }
    }
    DeviceMatrix gx(x), gw(w), gy(c.M, c.N), gres(res);
    cuda::gemm_f16_nn(bits(gx), bits(gw), gy.buf.get(), false, c.M, c.N, c.K, {}, nullptr);
    CHECK(relative_l2(gy.host().data, expect) < 2e-3);
    // The mma.sync family too (what sm_80/86 run; Hopper takes wgmma for N % 64 == 0).
    cuda::force_gemm_backward_path(cuda::GemmBackwardPath::MmaSync);
    cuda::gemm_f16_nn(bits(gx), bits(gw), gy.buf.get(), false, c.M, c.N, c.K, {}, nullptr);
    cuda::force_gemm_backward_path(cuda::GemmBackwardPath::Auto);
    CHECK(relative_l2(gy.host().data, expect) < 2e-3);
    cuda::GemmNnEpilogue e;
    e.residual = bits(gres);
    e.alpha = 1.5f;
    cuda::gemm_f16_nn(bits(gx), bits(gw), gres.buf.get(), false, c.M, c.N, c.K, e, nullptr);
    CHECK(relative_l2(gres.host().data, with_res) < 2e-3);  // residual aliases y
    auto y32 = device_floats(std::vector<float>(c.M * c.N, 1.0f));
    cuda::GemmNnEpilogue acc;
    acc.accumulate = true;
    cuda::gemm_f16_nn(bits(gx), bits(gw), y32.get(), true, c.M, c.N, c.K, acc, nullptr);
    std::vector<float> plus_one = expect;
    for (float& v : plus_one) v += 1.0f;
    CHECK(relative_l2(download(y32), plus_one) < 1e-3);

    // TN: Y[M', N'] = A[K', M']^T B[K', N'] with K' = the GEMM's M (tokens, any size).
    if (c.N % 8 == 0 && c.K % 8 == 0) {
      const std::int64_t T = c.M, Mo = c.N, No = c.K;
      const HostMatrix a = random_fp16(T, Mo, 14), b = random_fp16(T, No, 15);
      std::vector<float> dw(Mo * No);
      for (std::int64_t i = 0; i < Mo; ++i) {
        for (std::int64_t j = 0; j < No; ++j) {
          double s = 0;
          for (std::int64_t t = 0; t < T; ++t) s += double(a.at(t, i)) * b.at(t, j);
          dw[i * No + j] = static_cast<float>(s);
        }
      }
      DeviceMatrix ga(a), gb(b);
      auto gdw = device_floats(std::vector<float>(Mo * No, 0.0f));
      cuda::gemm_f16_tn(bits(ga), bits(gb), gdw.get(), false, Mo, No, T, nullptr);
      CHECK(relative_l2(download(gdw), dw) < 1e-3);
    }
  }
  DeviceMatrix x(random_fp16(4, 8, 1));
  CHECK_THROWS_WITH(cuda::gemm_f16_nn(bits(x), bits(x), x.buf.get(), false, 4, 12, 8, {}, nullptr),
                    QG_CONTAINS("multiple of 8"));
  cuda::GemmNnEpilogue acc;
  acc.accumulate = true;
  CHECK_THROWS_WITH(cuda::gemm_f16_nn(bits(x), bits(x), x.buf.get(), false, 4, 8, 8, acc, nullptr),
                    QG_CONTAINS("accumulate"));
}

namespace {

/// One packed batch of sequences for the attention tests, fused qkv rows on the host.
struct AttentionCase {
  int heads, head_dim;
  std::vector<int> lengths, contexts;
};

// q, k, v [n, H] of sequence s from the packed qkv rows (per head q, k, v slices).
void split_qkv(const HostMatrix& qkv, int first, int n, int heads, int hd, std::vector<float>& q,
               std::vector<float>& k, std::vector<float>& v) {
  const int H = heads * hd;
  q.assign(n * H, 0.0f);
  k.assign(n * H, 0.0f);
  v.assign(n * H, 0.0f);
  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int d = 0; d < hd; ++d) {
        q[t * H + h * hd + d] = qkv.at(first + t, h * 3 * hd + d);
        k[t * H + h * hd + d] = qkv.at(first + t, h * 3 * hd + hd + d);
        v[t * H + h * hd + d] = qkv.at(first + t, h * 3 * hd + 2 * hd + d);
      }
    }
  }
}

}  // namespace

TEST_CASE("GPU rotary on fused qkv rows matches the reference and inverts", "[cuda][train]") {
  // 64 and 128 take the 16-byte path, 40 (quarters of 10 pairs) the one-pair path.
  const int hd = GENERATE(64, 128, 40);
  const int heads = 3, T = 9, H = heads * hd;
  INFO("head_dim " << hd);
  const HostMatrix qkv = random_fp16(T, 3 * H, 21);
  std::vector<int> pos(T), block(T);
  for (int t = 0; t < T; ++t) {
    pos[t] = t < 5 ? t : 4;
    block[t] = t < 5 ? 0 : t - 4;
  }
  std::vector<float> q, k, v;
  split_qkv(qkv, 0, T, heads, hd, q, k, v);
  train::glm_rotary_forward(q.data(), T, heads, hd, pos.data(), block.data());
  train::glm_rotary_forward(k.data(), T, heads, hd, pos.data(), block.data());
  DeviceMatrix g(qkv);
  auto gp = device_ints(pos), gb = device_ints(block);
  cuda::glm_rotary_qkv(g.buf.get(), T, heads, hd, gp.get(), gb.get(), false, nullptr);
  const HostMatrix rotated = g.host();
  std::vector<float> rq, rk, rv;
  split_qkv(rotated, 0, T, heads, hd, rq, rk, rv);
  CHECK(relative_l2(rq, q) < 2e-3);
  CHECK(relative_l2(rk, k) < 2e-3);
  CHECK(relative_l2(rv, v) == 0.0);
  cuda::glm_rotary_qkv(g.buf.get(), T, heads, hd, gp.get(), gb.get(), true, nullptr);
  CHECK(relative_l2(g.host().data, qkv.data) < 2e-3);
  CHECK_THROWS_WITH(
      cuda::glm_rotary_qkv(g.buf.get(), T, heads, 6, gp.get(), gb.get(), false, nullptr),
      QG_CONTAINS("head_dim"));
}

TEST_CASE("GPU training attention forward (lse) and backward match the reference",
          "[cuda][train][attention]") {
  for (const AttentionCase& c :
       {AttentionCase{2, 64, {1, 17, 100}, {1, 0, 40}}, AttentionCase{1, 128, {64, 5}, {64, 2}},
        AttentionCase{4, 32, {257, 33}, {100, 33}}, AttentionCase{2, 128, {512}, {256}},
        // Many packed sequences of odd lengths, prefixes from none to all: query tiles seen by
        // one key block up to all of them.
        AttentionCase{2, 128, {300, 129, 1, 700, 64, 191}, {150, 0, 1, 333, 64, 190}},
        AttentionCase{3, 64, {450, 2, 3, 385}, {0, 2, 1, 200}},
        AttentionCase{2, 32, {1000, 31}, {999, 7}}}) {
    const int heads = c.heads, hd = c.head_dim, H = heads * hd;
    std::vector<int> row_start = {0};
    for (int n : c.lengths) row_start.push_back(row_start.back() + n);
    const int T = row_start.back();
    INFO("heads " << heads << " head_dim " << hd << " tokens " << T);
    const HostMatrix qkv = random_fp16(T, 3 * H, 31, 1.5f), dout = random_fp16(T, H, 32);
    std::vector<float> out(T * H), lse(T * heads), dqkv(T * 3 * H, 0.0f);
    int longest = 0;
    for (std::size_t s = 0; s < c.lengths.size(); ++s) {
      const int n = c.lengths[s], r0 = row_start[s];
      longest = std::max(longest, n);
      std::vector<float> q, k, v;
      split_qkv(qkv, r0, n, heads, hd, q, k, v);
      const train::GlmAttentionShape shape{heads, hd, n, n, c.contexts[s]};
      train::glm_attention_forward(q.data(), k.data(), v.data(), shape, out.data() + r0 * H,
                                   lse.data() + r0 * heads);
      std::vector<float> dq(n * H, 0.0f), dk(n * H, 0.0f), dv(n * H, 0.0f);
      train::glm_attention_backward(q.data(), k.data(), v.data(), out.data() + r0 * H,
                                    lse.data() + r0 * heads, dout.data.data() + r0 * H, shape,
                                    dq.data(), dk.data(), dv.data());
      for (int t = 0; t < n; ++t) {
        for (int h = 0; h < heads; ++h) {
          for (int d = 0; d < hd; ++d) {
            float* row = dqkv.data() + (r0 + t) * 3 * H + h * 3 * hd;
            row[d] = dq[t * H + h * hd + d];
            row[hd + d] = dk[t * H + h * hd + d];
            row[2 * hd + d] = dv[t * H + h * hd + d];
          }
        }
      }
    }
    // GLM-style rotary positions of every row, for the fused inverse rotary below.
    std::vector<int> positions, block_positions;
    for (std::size_t s = 0; s < c.lengths.size(); ++s) {
      const int ctx = c.contexts[s];
      for (int t = 0; t < c.lengths[s]; ++t) {
        positions.push_back(static_cast<int>(s) + (t < ctx ? t : std::max(ctx - 1, 0)));
        block_positions.push_back(t < ctx ? 0 : t - ctx + 1);
      }
    }
    auto gstart = device_ints(row_start), gctx = device_ints(c.contexts);
    auto gpos = device_ints(positions), gbpos = device_ints(block_positions);
    cuda::TrainAttentionBatch batch;
    batch.num_seqs = static_cast<int>(c.lengths.size());
    batch.total_tokens = T;
    batch.max_seq_len = longest;
    batch.row_start = gstart.get();
    batch.context_length = gctx.get();
    DeviceMatrix gqkv(qkv), gout(T, H), gdout(dout), gdqkv(T, 3 * H);
    DeviceBuffer<float> glse(T * heads);
    // Both tile configurations; they agree bit for bit (same arithmetic per row, in the same
    // order: a key tile a row cannot see changes neither its maximum nor its sums).
    std::vector<float> first_out, first_lse;
    for (const auto tiles : test::kPrefillTiles) {
      INFO("prefill tiles " << test::prefill_tiles_name(tiles));
      const test::PinnedAttentionPrefill pinned(tiles);
      QG_CUDA_CHECK(cudaMemset(gout.buf.get(), 0xff, static_cast<std::size_t>(T) * H * 2));
      QG_CUDA_CHECK(cudaMemset(glse.get(), 0xff, static_cast<std::size_t>(T) * heads * 4));
      cuda::attention_train_forward(gqkv.buf.get(), batch, heads, hd, gout.buf.get(), glse.get(),
                                    nullptr);
      const auto out_now = gout.host().data, lse_now = download(glse);
      CHECK(relative_l2(out_now, out) < 5e-3);
      CHECK(relative_l2(lse_now, lse) < 1e-4);
      if (first_out.empty()) {
        first_out = out_now;
        first_lse = lse_now;
      } else {
        CHECK(out_now == first_out);
        CHECK(lse_now == first_lse);
      }
    }
    // The backward reads the reference's out so only its own rounding is measured. Every tile
    // configuration and dq reduction runs, twice, on a workspace full of garbage.
    DeviceMatrix gref_out(test::round_to_fp16(HostMatrix{T, H, out}));
    const std::size_t ws = cuda::attention_train_backward_workspace_bytes(T, heads, hd);
    DeviceBuffer<char> work(ws);
    QG_CUDA_CHECK(cudaMemset(work.get(), 0xff, ws));
    const HostMatrix ref{T, 3 * H, dqkv};
    std::vector<float> rq, rk, rv;
    split_qkv(ref, 0, T, heads, hd, rq, rk, rv);
    for (const auto tiles :
         {cuda::AttentionBackwardTiles::Auto, cuda::AttentionBackwardTiles::Narrow}) {
      for (const auto dq :
           {cuda::AttentionBackwardDq::TileCounters, cuda::AttentionBackwardDq::SeparatePass}) {
        INFO("narrow tiles " << (tiles == cuda::AttentionBackwardTiles::Narrow)
                             << ", separate dq pass "
                             << (dq == cuda::AttentionBackwardDq::SeparatePass));
        const test::PinnedAttentionBackward pinned(tiles, dq);
        for (int repeat = 0; repeat < 2; ++repeat) {
          QG_CUDA_CHECK(cudaMemset(gdqkv.buf.get(), 0xff, static_cast<std::size_t>(T) * 3 * H * 2));
          cuda::attention_train_backward(gqkv.buf.get(), gref_out.buf.get(), glse.get(),
                                         gdout.buf.get(), batch, heads, hd, gdqkv.buf.get(),
                                         work.get(), ws, nullptr);
          std::vector<float> gq, gk, gv;
          split_qkv(gdqkv.host(), 0, T, heads, hd, gq, gk, gv);
          CHECK(relative_l2(gq, rq) < 2e-2);
          CHECK(relative_l2(gk, rk) < 2e-2);
          CHECK(relative_l2(gv, rv) < 2e-2);
        }
        // The rotary's backward fused in: what the separate inverse rotation makes of the
        // result above, bit for bit for dk and dv (dq: up to the order of its fp32 atomics).
        cuda::glm_rotary_qkv(gdqkv.buf.get(), T, heads, hd, gpos.get(), gbpos.get(), true, nullptr);
        std::vector<float> wq, wk, wv, fq, fk, fv;
        split_qkv(gdqkv.host(), 0, T, heads, hd, wq, wk, wv);
        QG_CUDA_CHECK(cudaMemset(gdqkv.buf.get(), 0xff, static_cast<std::size_t>(T) * 3 * H * 2));
        cuda::attention_train_backward(gqkv.buf.get(), gref_out.buf.get(), glse.get(),
                                       gdout.buf.get(), batch, heads, hd, gdqkv.buf.get(),
                                       work.get(), ws, nullptr, {gpos.get(), gbpos.get()});
        split_qkv(gdqkv.host(), 0, T, heads, hd, fq, fk, fv);
        CHECK(fk == wk);
        CHECK(fv == wv);
        CHECK(relative_l2(fq, wq) < 1e-3);
      }
    }
    CHECK_THROWS_WITH(
        cuda::attention_train_backward(gqkv.buf.get(), gref_out.buf.get(), glse.get(),
                                       gdout.buf.get(), batch, heads, hd, gdqkv.buf.get(),
                                       work.get(), ws, nullptr, {gpos.get(), nullptr}),
        QG_CONTAINS("block_positions"));
  }
}
