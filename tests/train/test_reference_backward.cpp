// Finite-difference checks of every CPU reference backward op (train/reference_backward.h),
// plus the forward conventions they rely on: the GLM attention equals the inference backend's,
// dropout masks are seeded and inverted, the fused cross-entropy equals the plain one.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "catch.hpp"
#include "finite_difference.h"
#include "qinggeng/error.h"
#include "qinggeng/model/backend.h"
#include "qinggeng/text/glm_layout.h"
#include "qinggeng/train/reference_backward.h"

using namespace qg;
using namespace qg::train;
using test::gradient_error;

namespace {

std::vector<float> random_vector(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// sum_i w_i y_i in double: a scalar loss whose gradient with respect to y is w.
double project(const std::vector<float>& y, const std::vector<float>& w) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * w[i];
  return s;
}

std::vector<float> zeros(std::size_t n) { return std::vector<float>(n, 0.0f); }

constexpr double kTolerance = 1e-2;

}  // namespace

TEST_CASE("linear backward: dx, dW and db match finite differences", "[train]") {
  const int T = 5, K = 7, O = 4;
  auto x = random_vector(T * K, 1), w = random_vector(O * K, 2), b = random_vector(O, 3);
  const auto proj = random_vector(T * O, 4);
  std::vector<float> y(T * O);
  auto loss = [&] {
    linear_forward(x.data(), w.data(), b.data(), T, K, O, y.data());
    return project(y, proj);
  };
  auto dx = zeros(T * K), dw = zeros(O * K), db = zeros(O);
  linear_forward(x.data(), w.data(), b.data(), T, K, O, y.data());
  linear_backward(x.data(), w.data(), proj.data(), T, K, O, dx.data(), dw.data(), db.data());
  CHECK(gradient_error(x, dx.data(), loss) < kTolerance);
  CHECK(gradient_error(w, dw.data(), loss) < kTolerance);
  CHECK(gradient_error(b, db.data(), loss) < kTolerance);

  SECTION("gradients accumulate and a null dW is skipped") {
    auto dx2 = dx;
    linear_backward(x.data(), w.data(), proj.data(), T, K, O, dx2.data(), nullptr, nullptr);
    for (std::size_t i = 0; i < dx.size(); ++i) CHECK(dx2[i] == Approx(2 * dx[i]));
  }
  SECTION("bad sizes are an error") {
    REQUIRE_THROWS_WITH(linear_forward(x.data(), w.data(), nullptr, T, 0, O, y.data()),
                        QG_CONTAINS("linear_forward"));
  }
}

TEST_CASE("layer_norm backward: dx, dgamma and dbeta match finite differences", "[train]") {
  const int R = 3, N = 16;
  auto x = random_vector(R * N, 5, 2.0f), gamma = random_vector(N, 6), beta = random_vector(N, 7);
  for (auto& g : gamma) g += 1.0f;
  const auto proj = random_vector(R * N, 8);
  std::vector<float> y(R * N), mean(R), rstd(R);
  auto loss = [&] {
    layer_norm_forward(x.data(), gamma.data(), beta.data(), R, N, 1e-5f, y.data(), mean.data(),
                       rstd.data());
    return project(y, proj);
  };
  loss();
  auto dx = zeros(R * N), dgamma = zeros(N), dbeta = zeros(N);
  layer_norm_backward(x.data(), gamma.data(), mean.data(), rstd.data(), proj.data(), R, N,
                      dx.data(), dgamma.data(), dbeta.data());
  CHECK(gradient_error(x, dx.data(), loss) < kTolerance);
  CHECK(gradient_error(gamma, dgamma.data(), loss) < kTolerance);
  CHECK(gradient_error(beta, dbeta.data(), loss) < kTolerance);
}

TEST_CASE("gelu and the scaled residual backward match finite differences", "[train]") {
  const int N = 64;
  auto x = random_vector(N, 9, 3.0f), b = random_vector(N, 10);
  const auto proj = random_vector(N, 11);
  std::vector<float> y(N);
  auto gelu_loss = [&] {
    gelu_forward(x.data(), N, y.data());
    return project(y, proj);
  };
  auto dx = zeros(N);
  gelu_backward(x.data(), proj.data(), N, dx.data());
  CHECK(gradient_error(x, dx.data(), gelu_loss) < kTolerance);

  const float alpha = 7.483315f;
  auto residual_loss = [&] {
    scaled_residual_forward(x.data(), alpha, b.data(), N, y.data());
    return project(y, proj);
  };
  auto da = zeros(N), db = zeros(N);
  scaled_residual_backward(proj.data(), alpha, N, da.data(), db.data());
  CHECK(gradient_error(x, da.data(), residual_loss) < kTolerance);
  CHECK(gradient_error(b, db.data(), residual_loss) < kTolerance);
}

TEST_CASE("2-D rotary backward is the inverse rotation and matches finite differences", "[train]") {
  const int T = 4, heads = 2, hd = 8;
  const std::vector<int> pos = {0, 1, 2, 2}, block = {0, 0, 1, 2};
  auto x = random_vector(T * heads * hd, 12);
  const auto proj = random_vector(x.size(), 13);
  std::vector<float> y;
  auto loss = [&] {
    y = x;
    glm_rotary_forward(y.data(), T, heads, hd, pos.data(), block.data());
    return project(y, proj);
  };
  auto dx = proj;
  glm_rotary_backward(dx.data(), T, heads, hd, pos.data(), block.data());
  CHECK(gradient_error(x, dx.data(), loss) < kTolerance);

  // Rotating back recovers the input.
  loss();
  glm_rotary_backward(y.data(), T, heads, hd, pos.data(), block.data());
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(y[i] == Approx(x[i]).margin(1e-6));
  REQUIRE_THROWS_WITH(glm_rotary_forward(y.data(), T, heads, 6, pos.data(), block.data()),
                      QG_CONTAINS("multiple of 4"));
}

TEST_CASE("GLM attention backward matches finite differences (ctx mid-sequence, past tokens)",
          "[train]") {
  // 9 keys of which the first 3 are past tokens; ctx 5 lies inside the new queries, so some
  // queries see later context keys (bidirectional) and the rest are causal.
  int ctx = GENERATE(5, 0, 9);
  GlmAttentionShape s{3, 8, 6, 9, ctx};
  const int H = s.heads * s.head_dim;
  auto q = random_vector(s.queries * H, 14), k = random_vector(s.keys * H, 15);
  auto v = random_vector(s.keys * H, 16);
  const auto proj = random_vector(s.queries * H, 17);
  std::vector<float> out(s.queries * H), lse(s.queries * s.heads);
  auto loss = [&] {
    glm_attention_forward(q.data(), k.data(), v.data(), s, out.data(), lse.data());
    return project(out, proj);
  };
  loss();
  auto dq = zeros(q.size()), dk = zeros(k.size()), dv = zeros(v.size());
  glm_attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), proj.data(), s,
                         dq.data(), dk.data(), dv.data());
  CHECK(gradient_error(q, dq.data(), loss) < kTolerance);
  CHECK(gradient_error(k, dk.data(), loss) < kTolerance);
  CHECK(gradient_error(v, dv.data(), loss) < kTolerance);
  // The last key is visible only to the last query unless it is context: with that query's
  // output gradient zeroed, the key gets a gradient exactly when it is context.
  auto proj_early = proj;
  std::fill(proj_early.end() - H, proj_early.end(), 0.0f);
  auto dk2 = zeros(k.size()), dv2 = zeros(v.size());
  glm_attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), proj_early.data(), s,
                         nullptr, dk2.data(), dv2.data());
  double last_key = 0;
  for (int d = 0; d < H; ++d)
    last_key += std::abs(dk2[(s.keys - 1) * H + d]) + std::abs(dv2[(s.keys - 1) * H + d]);
  CHECK((last_key > 0) == (ctx == s.keys));
}

TEST_CASE("GLM attention forward equals the inference backend's (rotary, mask, KV cache)",
          "[train]") {
  const int nh = 2, hd = 8, H = nh * hd, past = 3, n = 5, ctx = 4;
  const text::GlmLayout layout{ctx, ctx - 1};
  auto qkv_values = random_vector((past + n) * 3 * H, 18);

  auto backend = model::make_cpu_backend(1);
  const model::AttentionShape shape{nh, hd};
  auto cache = backend->new_kv_cache(1, shape, past + n);
  Tensor out;
  for (int begin : {0, past}) {
    const int count = begin == 0 ? past : n;
    Tensor qkv = backend->activation(count, 3 * H);
    std::copy(qkv_values.begin() + begin * 3 * H, qkv_values.begin() + (begin + count) * 3 * H,
              qkv.as<float>());
    model::SequenceChunk chunk;
    chunk.cache = cache.get();
    chunk.tokens.assign(count, 0);
    for (int t = begin; t < begin + count; ++t) {
      chunk.positions.push_back(layout.position(t));
      chunk.block_positions.push_back(layout.block_position(t));
    }
    chunk.context_length = ctx;
    out = backend->activation(count, H);
    backend->begin_forward({chunk});
    backend->attention(qkv, {chunk}, 0, shape, out);
    cache->advance(count);
  }

  // The reference: split the per-head (q, k, v) slices, rotate, attend with 3 past tokens.
  const int T = past + n;
  std::vector<float> q(T * H), k(T * H), v(T * H);
  std::vector<int> pos, block;
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < nh; ++h) {
      const float* src = qkv_values.data() + t * 3 * H + h * 3 * hd;
      std::copy(src, src + hd, q.data() + t * H + h * hd);
      std::copy(src + hd, src + 2 * hd, k.data() + t * H + h * hd);
      std::copy(src + 2 * hd, src + 3 * hd, v.data() + t * H + h * hd);
    }
    pos.push_back(layout.position(t));
    block.push_back(layout.block_position(t));
  }
  glm_rotary_forward(q.data(), T, nh, hd, pos.data(), block.data());
  glm_rotary_forward(k.data(), T, nh, hd, pos.data(), block.data());
  std::vector<float> ref(n * H), lse(n * nh);
  glm_attention_forward(q.data() + past * H, k.data(), v.data(), {nh, hd, n, T, ctx}, ref.data(),
                        lse.data());
  for (int i = 0; i < n * H; ++i) CHECK(out.as<float>()[i] == Approx(ref[i]).margin(1e-5));

  REQUIRE_THROWS_WITH(glm_attention_forward(q.data(), k.data(), v.data(), {nh, hd, n, T, T + 1},
                                            ref.data(), lse.data()),
                      QG_CONTAINS("context_length"));
}

TEST_CASE("LoRA backward with dropout: dA, dB and dx match finite differences", "[train]") {
  LoraShape s;
  s.tokens = 4;
  s.in = 12;
  s.out = 10;
  s.rank = 3;
  s.scale = 2.0f;
  s.dropout = GENERATE(0.0f, 0.3f);
  s.seed = 77;
  auto x = random_vector(s.tokens * s.in, 19), a = random_vector(s.rank * s.in, 20);
  auto b = random_vector(s.out * s.rank, 21);
  const auto base = random_vector(s.tokens * s.out, 22), proj = random_vector(s.tokens * s.out, 23);
  std::vector<float> y, u(s.tokens * s.rank);
  auto loss = [&] {
    y = base;
    lora_forward(x.data(), a.data(), b.data(), s, y.data(), u.data());
    return project(y, proj);
  };
  loss();
  auto dx = zeros(x.size()), da = zeros(a.size()), db = zeros(b.size());
  lora_backward(x.data(), a.data(), b.data(), u.data(), proj.data(), s, dx.data(), da.data(),
                db.data());
  CHECK(gradient_error(x, dx.data(), loss) < kTolerance);
  CHECK(gradient_error(a, da.data(), loss) < kTolerance);
  CHECK(gradient_error(b, db.data(), loss) < kTolerance);
  if (s.dropout > 0) {
    int dropped = 0;
    for (float g : dx) dropped += g == 0.0f;
    CHECK(dropped > 0);  // dropped inputs get no gradient
  }
}

TEST_CASE("dropout masks are seeded, keep about 1 - p, and scale kept values by 1 / (1 - p)",
          "[train]") {
  const int n = 20000;
  int kept = 0, same = 0;
  for (int i = 0; i < n; ++i) {
    kept += dropout_keep(5, i, 0.25f);
    same += dropout_keep(5, i, 0.25f) == dropout_keep(6, i, 0.25f);
  }
  CHECK(std::abs(kept / static_cast<double>(n) - 0.75) < 0.02);
  CHECK(same < n * 0.7);  // another seed draws another mask
  CHECK(dropout_keep(5, 3, 0.0f));

  // One input, A = 1, B = 1: the output is x / (1 - p) when kept, 0 when dropped.
  LoraShape s{1, 1, 1, 1, 1.0f, 0.5f, 0};
  const float x = 3.0f, one = 1.0f;
  float u = 0, y = 0;
  lora_forward(&x, &one, &one, s, &y, &u);
  CHECK(y == Approx(dropout_keep(0, 0, 0.5f) ? 6.0f : 0.0f));
  s.dropout = 1.0f;
  REQUIRE_THROWS_WITH(lora_forward(&x, &one, &one, s, &y, &u), QG_CONTAINS("dropout"));
}

TEST_CASE("embedding backward scatter-adds into the rows of repeated ids", "[train]") {
  const int V = 6, H = 4;
  const std::vector<int> ids = {2, 0, 2, 5};
  auto table = random_vector(V * H, 24);
  const auto proj = random_vector(ids.size() * H, 25);
  std::vector<float> out(ids.size() * H);
  auto loss = [&] {
    embedding_forward(table.data(), V, H, ids.data(), static_cast<int>(ids.size()), out.data());
    return project(out, proj);
  };
  auto dtable = zeros(table.size());
  embedding_backward(ids.data(), static_cast<int>(ids.size()), proj.data(), V, H, dtable.data());
  CHECK(gradient_error(table, dtable.data(), loss) < kTolerance);
  CHECK(dtable[2 * H] == Approx(proj[0] + proj[2 * H]));
  const std::vector<int> bad = {1, 6};
  REQUIRE_THROWS_WITH(embedding_forward(table.data(), V, H, bad.data(), 2, out.data()),
                      QG_CONTAINS("position 1"));
}

TEST_CASE("fused cross-entropy: loss equals the plain softmax NLL, gradients match FD", "[train]") {
  const int T = 7, H = 8, V = 37;
  auto hidden = random_vector(T * H, 26), head = random_vector(V * H, 27);
  const std::vector<int> targets = {3, kIgnoreLabel, 36, 0, kIgnoreLabel, 12, 3};
  CrossEntropyOptions blocked;
  blocked.row_chunk = 3;  // neither divides its dimension
  blocked.vocab_chunk = 5;

  // The plain computation with the whole logits matrix.
  double nll = 0;
  int labelled = 0;
  for (int t = 0; t < T; ++t) {
    if (targets[t] == kIgnoreLabel) continue;
    std::vector<double> logits(V);
    for (int v = 0; v < V; ++v) {
      logits[v] = 0;
      for (int d = 0; d < H; ++d)
        logits[v] += static_cast<double>(hidden[t * H + d]) * head[v * H + d];
    }
    double sum = 0;
    for (double l : logits) sum += std::exp(l);
    nll += std::log(sum) - logits[targets[t]];
    ++labelled;
  }
  auto dh = zeros(hidden.size()), dw = zeros(head.size());
  const auto r = fused_cross_entropy(hidden.data(), head.data(), targets.data(), T, H, V, blocked,
                                     dh.data(), dw.data());
  CHECK(r.tokens == labelled);
  CHECK(r.loss == Approx(nll / labelled).epsilon(1e-9));

  auto loss = [&] {
    return fused_cross_entropy(hidden.data(), head.data(), targets.data(), T, H, V, blocked,
                               nullptr, nullptr)
        .loss;
  };
  CHECK(gradient_error(hidden, dh.data(), loss) < kTolerance);
  CHECK(gradient_error(head, dw.data(), loss) < kTolerance);
  // Ignored rows get no gradient.
  for (int d = 0; d < H; ++d) CHECK(dh[1 * H + d] == 0.0f);

  SECTION("a normalizer replaces the labelled count") {
    CrossEntropyOptions sum = blocked;
    sum.normalizer = 1;
    auto dh_sum = zeros(hidden.size());
    const auto s = fused_cross_entropy(hidden.data(), head.data(), targets.data(), T, H, V, sum,
                                       dh_sum.data(), nullptr);
    CHECK(s.loss == Approx(nll).epsilon(1e-9));
    CHECK(dh_sum[0] == Approx(dh[0] * labelled).epsilon(1e-5));
  }
  SECTION("no labelled row gives zero loss and no gradient") {
    const std::vector<int> none(T, kIgnoreLabel);
    auto dz = zeros(hidden.size());
    const auto z = fused_cross_entropy(hidden.data(), head.data(), none.data(), T, H, V, {},
                                       dz.data(), nullptr);
    CHECK(z.loss == 0);
    CHECK(z.tokens == 0);
    CHECK(std::all_of(dz.begin(), dz.end(), [](float g) { return g == 0.0f; }));
  }
  SECTION("a label outside the vocabulary names its row") {
    auto bad = targets;
    bad[4] = V;
    REQUIRE_THROWS_WITH(
        fused_cross_entropy(hidden.data(), head.data(), bad.data(), T, H, V, {}, nullptr, nullptr),
        QG_CONTAINS("row 4"));
  }
}
