// The training kernels against the CPU reference of include/qinggeng/train/reference_backward.h
// on fp16-rounded inputs: LayerNorm with statistics and its backward, gelu and its backward,
// the embedding scatter, the backward GEMMs (dX = dY W, dW = dY^T X with the residual and
// accumulate epilogues), the 2-D rotary on fused qkv rows, GLM attention forward (lse) and
// backward over packed sequences, LoRA with dropout (same masks as the CPU) forward and
// backward, and the fused vocabulary cross-entropy. Gradients are compared by relative L2
// error; bad arguments are refused.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/cuda/lora_train.h"
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

TEST_CASE("GPU LayerNorm with statistics and its backward match the reference", "[cuda][train]") {
  for (const std::int64_t cols : {8, 100, 4096}) {
    INFO("cols " << cols);
    const std::int64_t rows = 7;
    const HostMatrix x = random_fp16(rows, cols, 1, 2.0f, 5.0f), gamma = random_fp16(1, cols, 2),
                     beta = random_fp16(1, cols, 3), dy = random_fp16(rows, cols, 4);
    std::vector<float> y(x.data.size()), mean(rows), rstd(rows);
    train::layer_norm_forward(x.data.data(), gamma.data.data(), beta.data.data(), rows, cols,
                              1e-5f, y.data(), mean.data(), rstd.data());
    std::vector<float> dx(x.data.size()), dg(cols), db(cols);
    train::layer_norm_backward(x.data.data(), gamma.data.data(), mean.data(), rstd.data(),
                               dy.data.data(), rows, cols, dx.data(), dg.data(), db.data());

    DeviceMatrix gx(x), gg(gamma), gb(beta), gy(rows, cols), gdy(dy), gdx(rows, cols);
    DeviceBuffer<float> gmean(rows), grstd(rows), gdg(cols), gdb(cols);
    QG_CUDA_CHECK(cudaMemset(gdg.get(), 0, cols * 4));
    QG_CUDA_CHECK(cudaMemset(gdb.get(), 0, cols * 4));
    cuda::layer_norm_forward_stats(gx.buf.get(), gg.buf.get(), gb.buf.get(), 1e-5f, rows, cols,
                                   gy.buf.get(), gmean.get(), grstd.get(), nullptr);
    cuda::layer_norm_backward(gx.buf.get(), gg.buf.get(), gmean.get(), grstd.get(), gdy.buf.get(),
                              rows, cols, gdx.buf.get(), gdg.get(), gdb.get(), nullptr);
    CHECK(relative_l2(gy.host().data, y) < 2e-3);
    CHECK(relative_l2(download(gmean), mean) < 1e-5);
    CHECK(relative_l2(download(grstd), rstd) < 1e-4);
    CHECK(relative_l2(gdx.host().data, dx) < 5e-3);
    CHECK(relative_l2(download(gdg), dg) < 5e-3);
    CHECK(relative_l2(download(gdb), db) < 5e-3);
    // dx may overwrite dy.
    cuda::layer_norm_backward(gx.buf.get(), gg.buf.get(), gmean.get(), grstd.get(), gdy.buf.get(),
                              rows, cols, gdy.buf.get(), nullptr, nullptr, nullptr);
    CHECK(relative_l2(gdy.host().data, dx) < 5e-3);
  }
  DeviceMatrix x(random_fp16(1, 8, 1));
  CHECK_THROWS_WITH(cuda::layer_norm_forward_stats(x.buf.get(), x.buf.get(), x.buf.get(), 1e-5f, 1,
                                                   8, x.buf.get(), nullptr, nullptr, nullptr),
                    QG_CONTAINS("null pointer"));
}

TEST_CASE("GPU gelu forward/backward and the embedding scatter match the reference",
          "[cuda][train]") {
  for (const std::int64_t n : {8, 1001, 65536}) {
    const HostMatrix x = random_fp16(1, n, 5, 3.0f), dy = random_fp16(1, n, 6);
    std::vector<float> y(n), dx(n, 0.0f);
    train::gelu_forward(x.data.data(), n, y.data());
    train::gelu_backward(x.data.data(), dy.data.data(), n, dx.data());
    DeviceMatrix gx(x), gy(1, n), gdy(dy);
    cuda::gelu_tanh_out(gx.buf.get(), n, gy.buf.get(), nullptr);
    cuda::gelu_tanh_backward(gx.buf.get(), gdy.buf.get(), n, gdy.buf.get(), nullptr);
    CHECK(relative_l2(gy.host().data, y) < 2e-3);
    CHECK(relative_l2(gdy.host().data, dx) < 2e-3);
  }
  const std::int64_t vocab = 50, cols = 24;
  const std::vector<int> ids = {3, 0, 49, 3, 17, 3};
  const HostMatrix dout = random_fp16(static_cast<std::int64_t>(ids.size()), cols, 7);
  std::vector<float> table(vocab * cols, 0.0f);
  train::embedding_backward(ids.data(), static_cast<std::int64_t>(ids.size()), dout.data.data(),
                            vocab, cols, table.data());
  DeviceMatrix gd(dout);
  auto gids = device_ints(ids);
  auto gtable = device_floats(std::vector<float>(vocab * cols, 0.0f));
  cuda::embedding_backward(gids.get(), static_cast<std::int64_t>(ids.size()), gd.buf.get(), vocab,
                           cols, gtable.get(), nullptr);
  CHECK(relative_l2(download(gtable), table) < 1e-6);
}

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
  const int heads = 3, hd = 64, T = 9, H = heads * hd;
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
  CHECK_THROWS_WITH(cuda::glm_rotary_qkv(g.buf.get(), T, heads, 6, gp.get(), gb.get(), false, nullptr),
                    QG_CONTAINS("head_dim"));
}

TEST_CASE("GPU training attention forward (lse) and backward match the reference",
          "[cuda][train][attention]") {
  for (const AttentionCase& c :
       {AttentionCase{2, 64, {1, 17, 100}, {1, 0, 40}}, AttentionCase{1, 128, {64, 5}, {64, 2}},
        AttentionCase{4, 32, {257, 33}, {100, 33}}, AttentionCase{2, 128, {512}, {256}}}) {
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
    auto gstart = device_ints(row_start), gctx = device_ints(c.contexts);
    cuda::TrainAttentionBatch batch;
    batch.num_seqs = static_cast<int>(c.lengths.size());
    batch.total_tokens = T;
    batch.max_seq_len = longest;
    batch.row_start = gstart.get();
    batch.context_length = gctx.get();
    DeviceMatrix gqkv(qkv), gout(T, H), gdout(dout), gdqkv(T, 3 * H);
    DeviceBuffer<float> glse(T * heads);
    cuda::attention_train_forward(gqkv.buf.get(), batch, heads, hd, gout.buf.get(), glse.get(),
                                  nullptr);
    CHECK(relative_l2(gout.host().data, out) < 5e-3);
    CHECK(relative_l2(download(glse), lse) < 1e-4);
    // The backward reads the reference's out so only its own rounding is measured.
    DeviceMatrix gref_out(test::round_to_fp16(HostMatrix{T, H, out}));
    const std::size_t ws = cuda::attention_train_backward_workspace_bytes(T, heads, hd);
    DeviceBuffer<char> work(ws);
    cuda::attention_train_backward(gqkv.buf.get(), gref_out.buf.get(), glse.get(), gdout.buf.get(),
                                   batch, heads, hd, gdqkv.buf.get(), work.get(), ws, nullptr);
    const HostMatrix got = gdqkv.host();
    std::vector<float> gq, gk, gv, rq, rk, rv;
    const HostMatrix ref{T, 3 * H, dqkv};
    split_qkv(got, 0, T, heads, hd, gq, gk, gv);
    split_qkv(ref, 0, T, heads, hd, rq, rk, rv);
    CHECK(relative_l2(gq, rq) < 2e-2);
    CHECK(relative_l2(gk, rk) < 2e-2);
    CHECK(relative_l2(gv, rv) < 2e-2);
  }
}

TEST_CASE("GPU LoRA with dropout matches the reference forward and backward", "[cuda][train][lora]") {
  for (const float p : {0.0f, 0.1f}) {
    for (const int rank : {1, 8, 24}) {
      const std::int64_t T = 37, in = 264, out = 520;
      INFO("dropout " << p << " rank " << rank);
      train::LoraShape shape{T, in, out, rank, 2.0f, p, 1234};
      const HostMatrix x = random_fp16(T, in, 41), dy = random_fp16(T, out, 42),
                       y0 = random_fp16(T, out, 43);
      const HostMatrix a = test::random_matrix(rank, in, 44, 0.1f),
                       b = test::random_matrix(out, rank, 45, 0.1f);
      std::vector<float> y = y0.data, u(T * rank), dx(T * in, 0.0f), da(rank * in, 0.0f),
                         db(out * rank, 0.0f);
      train::lora_forward(x.data.data(), a.data.data(), b.data.data(), shape, y.data(), u.data());
      train::lora_backward(x.data.data(), a.data.data(), b.data.data(), u.data(), dy.data.data(),
                           shape, dx.data(), da.data(), db.data());

      cuda::LoraTrainShape gs{T, in, out, rank, 2.0f, p, 1234};
      DeviceMatrix gx(x), gy(y0), gdy(dy), gdx(random_fp16(T, in, 46));
      const HostMatrix dx0 = gdx.host();
      auto ga = device_floats(a.data), gb = device_floats(b.data);
      DeviceBuffer<float> gu(T * rank);
      auto gda = device_floats(std::vector<float>(rank * in, 0.0f));
      auto gdb = device_floats(std::vector<float>(out * rank, 0.0f));
      const std::size_t ws = cuda::lora_train_workspace_bytes(gs);
      DeviceBuffer<char> work(ws);
      cuda::lora_train_forward(gx.buf.get(), ga.get(), gb.get(), gs, gy.buf.get(), gu.get(),
                               work.get(), ws, nullptr);
      cuda::lora_train_backward(gx.buf.get(), ga.get(), gb.get(), gu.get(), gdy.buf.get(), gs,
                                gdx.buf.get(), gda.get(), gdb.get(), work.get(), ws, nullptr);
      CHECK(relative_l2(download(gu), u) < 1e-4);
      CHECK(relative_l2(gy.host().data, y) < 2e-3);
      std::vector<float> got_dx = gdx.host().data;
      for (std::size_t i = 0; i < got_dx.size(); ++i) got_dx[i] -= dx0.data[i];
      CHECK(relative_l2(got_dx, dx) < 5e-3);
      CHECK(relative_l2(download(gda), da) < 1e-4);
      CHECK(relative_l2(download(gdb), db) < 1e-4);
    }
  }
  cuda::LoraTrainShape bad{4, 12, 16, 8, 1.0f, 0.0f, 0};
  CHECK_THROWS_WITH(cuda::lora_train_forward(nullptr, nullptr, nullptr, bad, nullptr, nullptr,
                                             nullptr, 0, nullptr),
                    QG_CONTAINS("multiples of 8"));
}

TEST_CASE("GPU fused cross-entropy matches the reference loss and gradients",
          "[cuda][train][cross_entropy]") {
  const std::int64_t rows = 45, hidden = 64, vocab = 1000;
  const HostMatrix h = random_fp16(rows, hidden, 51), head = random_fp16(vocab, hidden, 52, 0.3f);
  std::vector<int> targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) targets[r] = r % 7 == 3 ? -100 : (r * 37) % vocab;
  train::CrossEntropyOptions ref_options;
  ref_options.normalizer = 11.0;
  std::vector<float> dh(rows * hidden, 0.0f), dhead(vocab * hidden, 0.0f);
  const auto ref = train::fused_cross_entropy(h.data.data(), head.data.data(), targets.data(), rows,
                                              hidden, vocab, ref_options, dh.data(), dhead.data());
  for (const std::int64_t chunk : {8, 512}) {
    INFO("row_chunk " << chunk);
    cuda::CrossEntropyTrainOptions o;
    o.row_chunk = chunk;
    o.normalizer = 11.0;
    o.grad_scale = 64.0f;
    DeviceMatrix gh(h), ghead(head), gdh(rows, hidden);
    auto gt = device_ints(targets);
    DeviceBuffer<float> nll(rows);
    auto gdhead = device_floats(std::vector<float>(vocab * hidden, 0.0f));
    const std::size_t ws = cuda::cross_entropy_train_workspace_bytes(rows, vocab, o);
    DeviceBuffer<char> work(ws);
    cuda::cross_entropy_train(gh.buf.get(), ghead.buf.get(), gt.get(), rows, hidden, vocab, o,
                              nll.get(), gdh.buf.get(), gdhead.get(), work.get(), ws, nullptr);
    double sum = 0;
    for (float v : download(nll)) sum += v;
    CHECK(sum / 11.0 == Approx(ref.loss).epsilon(2e-3));
    std::vector<float> got_dh = gdh.host().data, got_dhead = download(gdhead);
    for (float& v : got_dh) v /= 64.0f;
    for (float& v : got_dhead) v /= 64.0f;
    CHECK(relative_l2(got_dh, dh) < 1e-2);
    CHECK(relative_l2(got_dhead, dhead) < 1e-2);
    // Loss only.
    cuda::cross_entropy_train(gh.buf.get(), ghead.buf.get(), gt.get(), rows, hidden, vocab, o,
                              nll.get(), nullptr, nullptr, work.get(), ws, nullptr);
    double again = 0;
    for (float v : download(nll)) again += v;
    CHECK(again == Approx(sum).epsilon(1e-6));
    CHECK_THROWS_WITH(cuda::cross_entropy_train(gh.buf.get(), ghead.buf.get(), gt.get(), rows,
                                                hidden, vocab, o, nll.get(), nullptr, nullptr,
                                                work.get(), 16, nullptr),
                      QG_CONTAINS("workspace"));
  }
}
