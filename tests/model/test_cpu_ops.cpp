// Every CPU reference op against straightforward math written here, over odd shapes.
#include <array>
#include <cmath>
#include <vector>

#include "backend_ops.h"
#include "catch.hpp"
#include "qinggeng/error.h"

using namespace qg;
using qg::test::HostMatrix;

namespace {

std::unique_ptr<model::Backend> cpu() { return model::make_cpu_backend(2); }

// Rotates one half (dim values) of a head by pos: the spec's rotate_half with fp16 inv_freq.
void rotate_reference(std::vector<double>& x, int offset, int dim, int pos) {
  const int quarter = dim / 2;
  for (int j = 0; j < quarter; ++j) {
    const double inv = half_to_float(float_to_half(static_cast<float>(std::pow(10000.0, -2.0 * j / dim))));
    const double angle = static_cast<float>(pos * inv);
    const double x1 = x[offset + j], x2 = x[offset + j + quarter];
    x[offset + j] = x1 * std::cos(angle) - x2 * std::sin(angle);
    x[offset + j + quarter] = x2 * std::cos(angle) + x1 * std::sin(angle);
  }
}

// softmax(q k^T / sqrt(d) + GLM mask) v over one whole sequence, in double.
HostMatrix attention_reference(const HostMatrix& qkv, int heads, int hd, int ctx,
                               const std::vector<int>& pos, const std::vector<int>& block) {
  const int n = static_cast<int>(qkv.rows), H = heads * hd;
  HostMatrix out{n, H, std::vector<float>(static_cast<std::size_t>(n) * H)};
  for (int h = 0; h < heads; ++h) {
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      for (int d = 0; d < hd; ++d) {
        q[t].push_back(qkv.at(t, h * 3 * hd + d));
        k[t].push_back(qkv.at(t, h * 3 * hd + hd + d));
        v[t].push_back(qkv.at(t, h * 3 * hd + 2 * hd + d));
      }
      for (auto* x : {&q[t], &k[t]}) {
        rotate_reference(*x, 0, hd / 2, pos[t]);
        rotate_reference(*x, hd / 2, hd / 2, block[t]);
      }
    }
    for (int i = 0; i < n; ++i) {
      std::vector<double> s(n, -1e300);
      double mx = -1e300;
      for (int j = 0; j < n; ++j) {
        if (!(j < ctx || j <= i)) continue;
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += q[i][d] * k[j][d];
        s[j] = dot / std::sqrt(static_cast<double>(hd));
        mx = std::max(mx, s[j]);
      }
      double total = 0;
      for (int j = 0; j < n; ++j) total += (s[j] > -1e299) ? std::exp(s[j] - mx) : 0.0;
      for (int d = 0; d < hd; ++d) {
        double acc = 0;
        for (int j = 0; j < n; ++j) {
          if (s[j] > -1e299) acc += std::exp(s[j] - mx) / total * v[j][d];
        }
        out.at(i, h * hd + d) = static_cast<float>(acc);
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("linear: x W^T + b over odd shapes") {
  auto be = cpu();
  for (auto [T, K, O] : std::vector<std::array<int, 3>>{{1, 1, 1}, {3, 7, 5}, {17, 33, 65}, {2, 129, 31}}) {
    const auto x = test::random_matrix(T, K, 1);
    const auto w = test::random_matrix(O, K, 2);
    const auto b = test::random_matrix(1, O, 3);
    for (bool with_bias : {false, true}) {
      const auto y = test::run_linear(*be, x, w, with_bias ? &b : nullptr);
      HostMatrix expect{T, O, std::vector<float>(static_cast<std::size_t>(T * O))};
      for (int t = 0; t < T; ++t) {
        for (int o = 0; o < O; ++o) {
          double acc = with_bias ? b.at(0, o) : 0.0;
          for (int k = 0; k < K; ++k) acc += static_cast<double>(x.at(t, k)) * w.at(o, k);
          expect.at(t, o) = static_cast<float>(acc);
        }
      }
      CHECK(test::tolerance_ratio(y, expect, 1e-5, 1e-5) <= 1.0);
    }
  }
}

TEST_CASE("layer_norm: (x - mean) / sqrt(var + eps) * gamma + beta") {
  auto be = cpu();
  for (int n : {1, 5, 64, 257}) {
    const auto x = test::random_matrix(4, n, 11, 3.0f, 1.5f);
    const auto g = test::random_matrix(1, n, 12, 0.1f, 1.0f);
    const auto b = test::random_matrix(1, n, 13, 0.1f);
    const auto y = test::run_layer_norm(*be, x, g, b, 1e-5f);
    HostMatrix expect = x;
    for (int r = 0; r < 4; ++r) {
      double mean = 0, var = 0;
      for (int i = 0; i < n; ++i) mean += x.at(r, i) / static_cast<double>(n);
      for (int i = 0; i < n; ++i) var += (x.at(r, i) - mean) * (x.at(r, i) - mean) / n;
      for (int i = 0; i < n; ++i) {
        expect.at(r, i) = static_cast<float>((x.at(r, i) - mean) / std::sqrt(var + 1e-5) * g.at(0, i) + b.at(0, i));
      }
    }
    CHECK(test::tolerance_ratio(y, expect, 1e-5, 1e-5) <= 1.0);
  }
}

TEST_CASE("gelu: the tanh approximation") {
  auto be = cpu();
  const auto x = test::random_matrix(3, 1000, 21, 4.0f);
  const auto y = test::run_gelu(*be, x);
  HostMatrix expect = x;
  for (auto& v : expect.data) {
    const double u = v;
    v = static_cast<float>(0.5 * u * (1 + std::tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))));
  }
  CHECK(test::tolerance_ratio(y, expect, 1e-6, 1e-5) <= 1.0);
}

TEST_CASE("scaled_add, embedding and gather_rows") {
  auto be = cpu();
  const auto a = test::random_matrix(3, 9, 31), b = test::random_matrix(3, 9, 32);
  const auto y = test::run_scaled_add(*be, a, 7.5f, b);
  for (std::size_t i = 0; i < a.data.size(); ++i) CHECK(y.data[i] == Approx(a.data[i] * 7.5f + b.data[i]));

  const auto table = test::random_matrix(10, 6, 33);
  const std::vector<int> ids = {9, 0, 3, 3};
  const auto e = test::run_embedding(*be, table, ids);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    for (int c = 0; c < 6; ++c) CHECK(e.at(static_cast<std::int64_t>(i), c) == table.at(ids[i], c));
  }
  REQUIRE_THROWS_AS(test::run_embedding(*be, table, {10}), qg::Error);

  const auto g = test::run_gather_rows(*be, table, {4, 1});
  CHECK(g.at(0, 2) == table.at(4, 2));
  CHECK(g.at(1, 5) == table.at(1, 5));
}

TEST_CASE("attention: 2-D rotary, GLM prefix mask, KV cache, batched sequences") {
  auto be = cpu();
  const model::AttentionShape shape{3, 16};
  const int H = 48;
  // Sequence A: context 5 tokens (mask at 3), then 4 generated; fed as 6 cached + 3 new.
  // Sequence B: no cache, context 2, then 5 tokens of tail, all new in one call.
  test::AttentionCase a{6, 5, {0, 1, 2, 3, 3, 3, 3, 3, 3}, {0, 0, 0, 0, 0, 1, 2, 3, 4}};
  test::AttentionCase b{0, 2, {0, 1, 1, 1, 1, 1, 1}, {0, 0, 1, 2, 3, 4, 5}};
  const auto qkv_a = test::random_matrix(9, 3 * H, 41);
  const auto qkv_b = test::random_matrix(7, 3 * H, 42);
  const auto out = test::run_attention(*be, shape, {a, b}, {qkv_a, qkv_b});
  const auto ref_a = attention_reference(qkv_a, 3, 16, a.context_length, a.positions, a.block_positions);
  const auto ref_b = attention_reference(qkv_b, 3, 16, b.context_length, b.positions, b.block_positions);
  HostMatrix expect{10, H, {}};
  expect.data.insert(expect.data.end(), ref_a.data.begin() + 6 * H, ref_a.data.end());
  expect.data.insert(expect.data.end(), ref_b.data.begin(), ref_b.data.end());
  CHECK(test::tolerance_ratio(out, expect, 1e-5, 1e-4) <= 1.0);
}

TEST_CASE("KV cache bookkeeping rejects overflow and bad truncation") {
  auto be = cpu();
  auto cache = be->new_kv_cache(1, {1, 8}, 4);
  cache->advance(3);
  CHECK(cache->length() == 3);
  REQUIRE_THROWS_AS(cache->advance(2), qg::Error);
  cache->truncate(1);
  CHECK(cache->length() == 1);
  REQUIRE_THROWS_AS(cache->truncate(2), qg::Error);
}
