// The one op test harness: runs a single Backend op on host float32 inputs and returns host
// float32 outputs. CPU-reference tests compare it with math written in the test; GPU tests
// compare a CUDA backend with the CPU backend through the same functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qinggeng/model/backend.h"

namespace qg::test {

/// A host matrix [rows, cols].
struct HostMatrix {
  std::int64_t rows = 0, cols = 0;
  std::vector<float> data;
  float& at(std::int64_t r, std::int64_t c) { return data[static_cast<std::size_t>(r * cols + c)]; }
  float at(std::int64_t r, std::int64_t c) const { return data[static_cast<std::size_t>(r * cols + c)]; }
};

inline HostMatrix random_matrix(std::int64_t rows, std::int64_t cols, std::uint32_t seed,
                                float scale = 1.0f, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(mean, scale);
  HostMatrix m{rows, cols, std::vector<float>(static_cast<std::size_t>(rows * cols))};
  for (auto& v : m.data) v = normal(rng);
  return m;
}

inline Tensor to_backend(model::Backend& be, const HostMatrix& m) {
  io::TensorView view{"test input", DType::F32, {m.rows, m.cols},
                      reinterpret_cast<const std::byte*>(m.data.data()),
                      m.data.size() * sizeof(float), "test"};
  return be.upload(view, m.rows, m.cols);
}

inline HostMatrix to_host(model::Backend& be, const Tensor& t) {
  HostMatrix m{t.rows(), t.cols(), std::vector<float>(static_cast<std::size_t>(t.numel()))};
  be.to_host(t, m.data.data());
  return m;
}

inline HostMatrix run_linear(model::Backend& be, const HostMatrix& x, const HostMatrix& w,
                             const HostMatrix* bias) {
  Tensor out = be.activation(x.rows, w.rows);
  be.linear(to_backend(be, x), to_backend(be, w), bias ? to_backend(be, *bias) : Tensor(), out);
  return to_host(be, out);
}

inline HostMatrix run_layer_norm(model::Backend& be, const HostMatrix& x, const HostMatrix& gamma,
                                 const HostMatrix& beta, float eps) {
  Tensor out = be.activation(x.rows, x.cols);
  be.layer_norm(to_backend(be, x), to_backend(be, gamma), to_backend(be, beta), eps, out);
  return to_host(be, out);
}

inline HostMatrix run_gelu(model::Backend& be, const HostMatrix& x) {
  Tensor t = to_backend(be, x);
  be.gelu(t);
  return to_host(be, t);
}

inline HostMatrix run_scaled_add(model::Backend& be, const HostMatrix& a, float alpha,
                                 const HostMatrix& b) {
  Tensor out = be.activation(a.rows, a.cols);
  be.scaled_add(to_backend(be, a), alpha, to_backend(be, b), out);
  return to_host(be, out);
}

inline HostMatrix run_embedding(model::Backend& be, const HostMatrix& table,
                                const std::vector<int>& ids) {
  Tensor out = be.activation(static_cast<std::int64_t>(ids.size()), table.cols);
  be.embedding(to_backend(be, table), ids, out);
  return to_host(be, out);
}

inline HostMatrix run_gather_rows(model::Backend& be, const HostMatrix& x,
                                  const std::vector<std::int64_t>& rows) {
  Tensor out = be.activation(static_cast<std::int64_t>(rows.size()), x.cols);
  be.gather_rows(to_backend(be, x), rows, out);
  return to_host(be, out);
}

/// One sequence of an attention test: its new tokens' qkv rows and layout.
struct AttentionCase {
  int past = 0;                        ///< tokens already in the cache (fed first)
  int context_length = 0;
  std::vector<int> positions, block_positions;  ///< for past + new tokens
};

/// Feeds each case's first `past` rows as one call, then the rest in a second batched call;
/// returns the attention output rows of the second call.
inline HostMatrix run_attention(model::Backend& be, const model::AttentionShape& shape,
                                const std::vector<AttentionCase>& cases,
                                const std::vector<HostMatrix>& qkv_per_case) {
  const int H = shape.num_heads * shape.head_dim;
  std::vector<std::unique_ptr<model::KvCache>> caches;
  std::vector<model::SequenceChunk> second;
  HostMatrix second_qkv{0, 3 * H, {}};
  for (std::size_t c = 0; c < cases.size(); ++c) {
    const auto& k = cases[c];
    const auto& qkv = qkv_per_case[c];
    caches.push_back(be.new_kv_cache(1, shape, static_cast<int>(qkv.rows)));
    auto make_chunk = [&](int begin, int end) {
      model::SequenceChunk ch;
      ch.cache = caches.back().get();
      ch.context_length = k.context_length;
      for (int t = begin; t < end; ++t) {
        ch.tokens.push_back(0);
        ch.positions.push_back(k.positions[static_cast<std::size_t>(t)]);
        ch.block_positions.push_back(k.block_positions[static_cast<std::size_t>(t)]);
      }
      return ch;
    };
    if (k.past > 0) {
      HostMatrix first{k.past, 3 * H,
                       std::vector<float>(qkv.data.begin(), qkv.data.begin() + k.past * 3 * H)};
      Tensor out = be.activation(k.past, H);
      std::vector<model::SequenceChunk> batch{make_chunk(0, k.past)};
      be.begin_forward(batch);
      be.attention(to_backend(be, first), batch, 0, shape, out);
      caches.back()->advance(k.past);
    }
    second.push_back(make_chunk(k.past, static_cast<int>(qkv.rows)));
    second_qkv.data.insert(second_qkv.data.end(), qkv.data.begin() + k.past * 3 * H, qkv.data.end());
    second_qkv.rows += qkv.rows - k.past;
  }
  Tensor out = be.activation(second_qkv.rows, H);
  be.begin_forward(second);
  be.attention(to_backend(be, second_qkv), second, 0, shape, out);
  return to_host(be, out);
}

/// Largest |a - b| / (atol + rtol * |b|) over all elements (<= 1 means within tolerance).
inline double tolerance_ratio(const HostMatrix& a, const HostMatrix& b, double atol, double rtol) {
  double worst = 0;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    const double err = std::abs(static_cast<double>(a.data[i]) - b.data[i]);
    worst = std::max(worst, err / (atol + rtol * std::abs(static_cast<double>(b.data[i]))));
  }
  return worst;
}

}  // namespace qg::test
