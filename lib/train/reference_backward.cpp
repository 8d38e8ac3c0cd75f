// CPU reference forward-with-saved-state and backward of every training op (see
// include/qinggeng/train/reference_backward.h). Loops are the textbook ones; reductions run in
// double so finite-difference checks and CUDA comparisons see float32 rounding only.
#include "qinggeng/train/reference_backward.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "qinggeng/counter_hash.h"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::train {
namespace {

using Index = std::int64_t;

double dot(const float* a, const float* b, Index n) {
  double acc = 0;
  for (Index i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

// out[r, :] += sum_k g(r, k) m[k, :] for r < rows, k < inner, rows of `cols` values, where
// g(r, k) = g[r * g_row + k * g_inner]; accumulated in double.
void add_weighted_rows(const float* g, Index g_row, Index g_inner, const float* m, Index rows,
                       Index inner, Index cols, float* out) {
  std::vector<double> acc(static_cast<std::size_t>(cols));
  for (Index r = 0; r < rows; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (Index k = 0; k < inner; ++k) {
      const double coef = g[r * g_row + k * g_inner];
      for (Index c = 0; c < cols; ++c) acc[static_cast<std::size_t>(c)] += coef * m[k * cols + c];
    }
    for (Index c = 0; c < cols; ++c)
      out[r * cols + c] += static_cast<float>(acc[static_cast<std::size_t>(c)]);
  }
}

void check_sizes(const char* op, Index tokens, Index in, Index out) {
  QG_CHECK(tokens >= 0 && in > 0 && out > 0, op, ": bad sizes tokens=", tokens, " in=", in,
           " out=", out);
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// Rotates each rotary half of every head by +angle (forward) or -angle (backward).
void rotate_heads(float* x, Index tokens, int heads, int head_dim, const int* positions,
                  const int* block_positions, float direction) {
  QG_CHECK(tokens >= 0 && heads > 0 && head_dim > 0 && head_dim % 4 == 0,
           "glm_rotary: bad sizes tokens=", tokens, " heads=", heads, " head_dim=", head_dim,
           " (head_dim must be a multiple of 4)");
  const int half = head_dim / 2, quarter = half / 2;
  const std::vector<float> inv_freq = glm_rotary_inv_freq(half);
  for (Index t = 0; t < tokens; ++t) {
    for (int part = 0; part < 2; ++part) {
      const int pos = part == 0 ? positions[t] : block_positions[t];
      for (int j = 0; j < quarter; ++j) {
        // Same rounding as the inference backend: a float angle, cos/sin in double.
        const float angle = static_cast<float>(pos) * inv_freq[static_cast<std::size_t>(j)];
        const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
        const float s = direction * static_cast<float>(std::sin(static_cast<double>(angle)));
        for (int h = 0; h < heads; ++h) {
          float* r = x + t * heads * head_dim + h * head_dim + part * half;
          const float x1 = r[j], x2 = r[j + quarter];
          r[j] = x1 * c - x2 * s;
          r[j + quarter] = x2 * c + x1 * s;
        }
      }
    }
  }
}

void check_attention(const GlmAttentionShape& s) {
  QG_CHECK(s.heads > 0 && s.head_dim > 0 && s.queries >= 0 && s.keys >= s.queries,
           "glm_attention: bad shape heads=", s.heads, " head_dim=", s.head_dim,
           " queries=", s.queries, " keys=", s.keys);
  QG_CHECK(s.context_length >= 0 && s.context_length <= s.keys, "glm_attention: context_length ",
           s.context_length, " outside [0, ", s.keys, "]");
}

// Keys visible to query i: every key below max(token + 1, ctx) (spec section 2).
int visible_keys(const GlmAttentionShape& s, int i) {
  const int token = s.keys - s.queries + i;
  return std::min(s.keys, std::max(token + 1, s.context_length));
}

void check_lora(const LoraShape& s) {
  QG_CHECK(s.tokens >= 0 && s.in > 0 && s.out > 0 && s.rank > 0,
           "lora: bad sizes tokens=", s.tokens, " in=", s.in, " out=", s.out, " rank=", s.rank);
  QG_CHECK(s.dropout >= 0.0f && s.dropout < 1.0f, "lora: dropout ", s.dropout, " outside [0, 1)");
}

// One row of dropout(x): kept elements scaled by 1 / (1 - p), dropped ones zero.
void dropout_row(const float* x, const LoraShape& s, Index t, std::vector<float>& row) {
  const float keep_scale = 1.0f / (1.0f - s.dropout);
  row.resize(static_cast<std::size_t>(s.in));
  for (Index i = 0; i < s.in; ++i) {
    const bool keep = dropout_keep(s.seed, static_cast<std::uint64_t>(t * s.in + i), s.dropout);
    row[static_cast<std::size_t>(i)] = keep ? x[t * s.in + i] * keep_scale : 0.0f;
  }
}

}  // namespace

// ---- linear -------------------------------------------------------------------------------

void linear_forward(const float* x, const float* w, const float* bias, Index tokens, Index in,
                    Index out, float* y) {
  check_sizes("linear_forward", tokens, in, out);
  for (Index t = 0; t < tokens; ++t) {
    for (Index o = 0; o < out; ++o) {
      const double b = bias ? bias[o] : 0.0;
      y[t * out + o] = static_cast<float>(dot(x + t * in, w + o * in, in) + b);
    }
  }
}

void linear_backward(const float* x, const float* w, const float* dy, Index tokens, Index in,
                     Index out, float* dx, float* dw, float* dbias) {
  check_sizes("linear_backward", tokens, in, out);
  // dx = dy W reads dy by rows; dW = dy^T x reads it by columns.
  if (dx) add_weighted_rows(dy, out, 1, w, tokens, out, in, dx);
  if (dw) add_weighted_rows(dy, 1, out, x, out, tokens, in, dw);
  if (dbias) {
    for (Index o = 0; o < out; ++o) {
      double sum = 0;
      for (Index t = 0; t < tokens; ++t) sum += dy[t * out + o];
      dbias[o] += static_cast<float>(sum);
    }
  }
}

// ---- LayerNorm ----------------------------------------------------------------------------

void layer_norm_forward(const float* x, const float* gamma, const float* beta, Index rows, Index n,
                        float eps, float* y, float* mean, float* rstd) {
  QG_CHECK(rows >= 0 && n > 0, "layer_norm_forward: bad sizes rows=", rows, " n=", n);
  for (Index r = 0; r < rows; ++r) {
    const float* in = x + r * n;
    double mu = 0, var = 0;
    for (Index i = 0; i < n; ++i) mu += in[i];
    mu /= static_cast<double>(n);
    for (Index i = 0; i < n; ++i) var += (in[i] - mu) * (in[i] - mu);
    var /= static_cast<double>(n);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (Index i = 0; i < n; ++i) {
      y[r * n + i] = static_cast<float>((in[i] - mu) * inv) * gamma[i] + beta[i];
    }
    mean[r] = static_cast<float>(mu);
    rstd[r] = static_cast<float>(inv);
  }
}

void layer_norm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                         const float* dy, Index rows, Index n, float* dx, float* dgamma,
                         float* dbeta) {
  QG_CHECK(rows >= 0 && n > 0, "layer_norm_backward: bad sizes rows=", rows, " n=", n);
  for (Index r = 0; r < rows; ++r) {
    const float* in = x + r * n;
    const float* g = dy + r * n;
    // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gamma.
    double sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (Index i = 0; i < n; ++i) {
      const double xhat = (static_cast<double>(in[i]) - mean[r]) * rstd[r];
      const double dxhat = static_cast<double>(g[i]) * gamma[i];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      if (dgamma) dgamma[i] += static_cast<float>(g[i] * xhat);
      if (dbeta) dbeta[i] += g[i];
    }
    if (!dx) continue;
    const double mean_dxhat = sum_dxhat / static_cast<double>(n);
    const double mean_dxhat_xhat = sum_dxhat_xhat / static_cast<double>(n);
    for (Index i = 0; i < n; ++i) {
      const double xhat = (static_cast<double>(in[i]) - mean[r]) * rstd[r];
      const double dxhat = static_cast<double>(g[i]) * gamma[i];
      dx[r * n + i] += static_cast<float>(rstd[r] * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
    }
  }
}

// ---- gelu and the GLM residual ------------------------------------------------------------

void gelu_forward(const float* x, Index n, float* y) {
  for (Index i = 0; i < n; ++i) {
    const float u = x[i];
    y[i] = 0.5f * u * (1.0f + std::tanh(kGeluC * u * (1.0f + kGeluA * u * u)));
  }
}

void gelu_backward(const float* x, const float* dy, Index n, float* dx) {
  for (Index i = 0; i < n; ++i) {
    const double u = x[i];
    const double th = std::tanh(kGeluC * u * (1.0 + kGeluA * u * u));
    const double inner_grad = kGeluC * (1.0 + 3.0 * kGeluA * u * u);
    dx[i] +=
        static_cast<float>(dy[i] * (0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * inner_grad));
  }
}

void scaled_residual_forward(const float* a, float alpha, const float* b, Index n, float* out) {
  for (Index i = 0; i < n; ++i) out[i] = a[i] * alpha + b[i];
}

void scaled_residual_backward(const float* dout, float alpha, Index n, float* da, float* db) {
  for (Index i = 0; i < n; ++i) {
    if (da) da[i] += alpha * dout[i];
    if (db) db[i] += dout[i];
  }
}

// ---- 2-D rotary ---------------------------------------------------------------------------

void glm_rotary_forward(float* x, Index tokens, int heads, int head_dim, const int* positions,
                        const int* block_positions) {
  rotate_heads(x, tokens, heads, head_dim, positions, block_positions, 1.0f);
}

void glm_rotary_backward(float* dx, Index tokens, int heads, int head_dim, const int* positions,
                         const int* block_positions) {
  rotate_heads(dx, tokens, heads, head_dim, positions, block_positions, -1.0f);
}

// ---- GLM attention ------------------------------------------------------------------------

void glm_attention_forward(const float* q, const float* k, const float* v,
                           const GlmAttentionShape& s, float* out, float* lse) {
  check_attention(s);
  const Index H = static_cast<Index>(s.heads) * s.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  std::vector<double> scores(static_cast<std::size_t>(s.keys));
  std::vector<double> acc(static_cast<std::size_t>(s.head_dim));
  for (int i = 0; i < s.queries; ++i) {
    const int visible = visible_keys(s, i);
    for (int h = 0; h < s.heads; ++h) {
      const float* qi = q + i * H + h * s.head_dim;
      double max_score = -std::numeric_limits<double>::infinity();
      for (int j = 0; j < visible; ++j) {
        scores[static_cast<std::size_t>(j)] =
            dot(qi, k + j * H + h * s.head_dim, s.head_dim) * scale;
        max_score = std::max(max_score, scores[static_cast<std::size_t>(j)]);
      }
      double total = 0;
      for (int j = 0; j < visible; ++j)
        total += std::exp(scores[static_cast<std::size_t>(j)] - max_score);
      const double row_lse = max_score + std::log(total);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int j = 0; j < visible; ++j) {
        const double p = std::exp(scores[static_cast<std::size_t>(j)] - row_lse);
        const float* vj = v + j * H + h * s.head_dim;
        for (int d = 0; d < s.head_dim; ++d) acc[static_cast<std::size_t>(d)] += p * vj[d];
      }
      for (int d = 0; d < s.head_dim; ++d)
        out[i * H + h * s.head_dim + d] = static_cast<float>(acc[static_cast<std::size_t>(d)]);
      lse[i * s.heads + h] = static_cast<float>(row_lse);
    }
  }
}

void glm_attention_backward(const float* q, const float* k, const float* v, const float* out,
                            const float* lse, const float* dout, const GlmAttentionShape& s,
                            float* dq, float* dk, float* dv) {
  check_attention(s);
  const Index H = static_cast<Index>(s.heads) * s.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  std::vector<double> dq_acc(static_cast<std::size_t>(s.head_dim));
  for (int i = 0; i < s.queries; ++i) {
    const int visible = visible_keys(s, i);
    for (int h = 0; h < s.heads; ++h) {
      const Index row = i * H + h * s.head_dim;
      const double delta = dot(dout + row, out + row, s.head_dim);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
      for (int j = 0; j < visible; ++j) {
        const Index key = j * H + h * s.head_dim;
        const double p = std::exp(dot(q + row, k + key, s.head_dim) * scale - lse[i * s.heads + h]);
        const double ds = p * (dot(dout + row, v + key, s.head_dim) - delta) * scale;
        for (int d = 0; d < s.head_dim; ++d) {
          dq_acc[static_cast<std::size_t>(d)] += ds * k[key + d];
          if (dk) dk[key + d] += static_cast<float>(ds * q[row + d]);
          if (dv) dv[key + d] += static_cast<float>(p * dout[row + d]);
        }
      }
      if (dq) {
        for (int d = 0; d < s.head_dim; ++d)
          dq[row + d] += static_cast<float>(dq_acc[static_cast<std::size_t>(d)]);
      }
    }
  }
}

// ---- LoRA with dropout --------------------------------------------------------------------

bool dropout_keep(std::uint64_t seed, std::uint64_t index, float p) {
  if (p <= 0.0f) return true;
  const std::uint32_t bits = counter_bits32(splitmix64(seed), index);
  const double uniform = static_cast<double>(bits >> 8) * (1.0 / 16777216.0);  // 24 bits
  return uniform >= p;
}

void lora_forward(const float* x, const float* a, const float* b, const LoraShape& s, float* y,
                  float* u) {
  check_lora(s);
  std::vector<float> xd;
  for (Index t = 0; t < s.tokens; ++t) {
    dropout_row(x, s, t, xd);
    for (Index r = 0; r < s.rank; ++r)
      u[t * s.rank + r] = static_cast<float>(dot(xd.data(), a + r * s.in, s.in));
    for (Index o = 0; o < s.out; ++o) {
      y[t * s.out + o] += static_cast<float>(s.scale * dot(u + t * s.rank, b + o * s.rank, s.rank));
    }
  }
}

void lora_backward(const float* x, const float* a, const float* b, const float* u, const float* dy,
                   const LoraShape& s, float* dx, float* da, float* db) {
  check_lora(s);
  const float keep_scale = 1.0f / (1.0f - s.dropout);
  std::vector<float> xd;
  std::vector<double> du(static_cast<std::size_t>(s.rank));
  for (Index t = 0; t < s.tokens; ++t) {
    const float* g = dy + t * s.out;
    // du = scale * dy B: the gradient reaching u = dropout(x) A^T.
    std::fill(du.begin(), du.end(), 0.0);
    for (Index o = 0; o < s.out; ++o) {
      for (Index r = 0; r < s.rank; ++r)
        du[static_cast<std::size_t>(r)] += static_cast<double>(g[o]) * b[o * s.rank + r];
    }
    for (auto& d : du) d *= s.scale;
    if (db) {
      for (Index o = 0; o < s.out; ++o) {
        for (Index r = 0; r < s.rank; ++r)
          db[o * s.rank + r] += static_cast<float>(s.scale * g[o] * u[t * s.rank + r]);
      }
    }
    if (da) {
      dropout_row(x, s, t, xd);
      for (Index r = 0; r < s.rank; ++r) {
        for (Index i = 0; i < s.in; ++i)
          da[r * s.in + i] +=
              static_cast<float>(du[static_cast<std::size_t>(r)] * xd[static_cast<std::size_t>(i)]);
      }
    }
    if (dx) {
      for (Index i = 0; i < s.in; ++i) {
        if (!dropout_keep(s.seed, static_cast<std::uint64_t>(t * s.in + i), s.dropout)) continue;
        double acc = 0;
        for (Index r = 0; r < s.rank; ++r) acc += du[static_cast<std::size_t>(r)] * a[r * s.in + i];
        dx[t * s.in + i] += static_cast<float>(acc * keep_scale);
      }
    }
  }
}

// ---- embedding ----------------------------------------------------------------------------

void embedding_forward(const float* table, Index vocab, Index hidden, const int* ids, Index tokens,
                       float* out) {
  for (Index t = 0; t < tokens; ++t) {
    QG_CHECK(ids[t] >= 0 && ids[t] < vocab, "embedding: token id ", ids[t], " at position ", t,
             " outside [0, ", vocab, ")");
    std::copy(table + ids[t] * hidden, table + (ids[t] + 1) * hidden, out + t * hidden);
  }
}

void embedding_backward(const int* ids, Index tokens, const float* dout, Index vocab, Index hidden,
                        float* dtable) {
  for (Index t = 0; t < tokens; ++t) {
    QG_CHECK(ids[t] >= 0 && ids[t] < vocab, "embedding_backward: token id ", ids[t],
             " at position ", t, " outside [0, ", vocab, ")");
    for (Index i = 0; i < hidden; ++i) dtable[ids[t] * hidden + i] += dout[t * hidden + i];
  }
}

// ---- fused cross-entropy ------------------------------------------------------------------

CrossEntropyResult fused_cross_entropy(const float* hidden, const float* lm_head,
                                       const int* targets, Index tokens, Index hidden_size,
                                       Index vocab, const CrossEntropyOptions& options,
                                       float* dhidden, float* dlm_head) {
  check_sizes("fused_cross_entropy", tokens, hidden_size, vocab);
  QG_CHECK(options.row_chunk > 0 && options.vocab_chunk > 0 && options.normalizer >= 0,
           "fused_cross_entropy: row_chunk ", options.row_chunk, ", vocab_chunk ",
           options.vocab_chunk, " must be positive and normalizer ", options.normalizer,
           " non-negative");
  CrossEntropyResult result;
  for (Index t = 0; t < tokens; ++t) {
    QG_CHECK(targets[t] == kIgnoreLabel || (targets[t] >= 0 && targets[t] < vocab),
             "fused_cross_entropy: label ", targets[t], " of row ", t, " outside [0, ", vocab,
             ") and not ", kIgnoreLabel);
    if (targets[t] != kIgnoreLabel) ++result.tokens;
  }
  if (result.tokens == 0) return result;
  const double normalizer =
      options.normalizer > 0 ? options.normalizer : static_cast<double>(result.tokens);
  const bool want_grad = dhidden || dlm_head;

  const Index R = options.row_chunk, C = std::min(options.vocab_chunk, vocab);
  std::vector<double> logits(static_cast<std::size_t>(R * C));  // the only logits ever held
  std::vector<double> row_max(static_cast<std::size_t>(R)), row_sum(static_cast<std::size_t>(R));
  std::vector<double> row_lse(static_cast<std::size_t>(R));
  std::vector<double> dh(static_cast<std::size_t>(hidden_size));
  double nll = 0;
  // For each vocabulary block: the logits of the labelled rows of [r0, r1) (a [R, C] tile, as
  // a GEMM would produce it), then visit(row, its logits in the block, v0, v1) per row.
  auto each_block = [&](Index r0, Index r1, const auto& visit) {
    for (Index v0 = 0; v0 < vocab; v0 += C) {
      const Index v1 = std::min(vocab, v0 + C);
      for (Index r = r0; r < r1; ++r) {
        if (targets[r] == kIgnoreLabel) continue;
        for (Index v = v0; v < v1; ++v) {
          logits[static_cast<std::size_t>((r - r0) * C + (v - v0))] =
              dot(hidden + r * hidden_size, lm_head + v * hidden_size, hidden_size);
        }
      }
      for (Index r = r0; r < r1; ++r) {
        if (targets[r] != kIgnoreLabel) visit(r, logits.data() + (r - r0) * C, v0, v1);
      }
    }
  };
  for (Index r0 = 0; r0 < tokens; r0 += R) {
    const Index r1 = std::min(tokens, r0 + R);
    std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<double>::infinity());
    std::fill(row_sum.begin(), row_sum.end(), 0.0);
    // Pass 1: online log-sum-exp over the vocabulary blocks.
    each_block(r0, r1, [&](Index r, const double* l, Index v0, Index v1) {
      double& m = row_max[static_cast<std::size_t>(r - r0)];
      double& sum = row_sum[static_cast<std::size_t>(r - r0)];
      const double new_max = std::max(m, *std::max_element(l, l + (v1 - v0)));
      sum *= std::exp(m - new_max);
      for (Index v = v0; v < v1; ++v) sum += std::exp(l[v - v0] - new_max);
      m = new_max;
      if (targets[r] >= v0 && targets[r] < v1) nll -= l[targets[r] - v0];
    });
    for (Index r = r0; r < r1; ++r) {
      if (targets[r] == kIgnoreLabel) continue;
      const std::size_t i = static_cast<std::size_t>(r - r0);
      row_lse[i] = row_max[i] + std::log(row_sum[i]);
      nll += row_lse[i];
    }
    if (!want_grad) continue;
    // Pass 2: the blocks again; dlogits = (softmax - onehot) / normalizer.
    each_block(r0, r1, [&](Index r, const double* l, Index v0, Index v1) {
      const float* h = hidden + r * hidden_size;
      std::fill(dh.begin(), dh.end(), 0.0);
      for (Index v = v0; v < v1; ++v) {
        const double p = std::exp(l[v - v0] - row_lse[static_cast<std::size_t>(r - r0)]);
        const double g = (p - (v == targets[r] ? 1.0 : 0.0)) / normalizer;
        const float* w = lm_head + v * hidden_size;
        for (Index d = 0; d < hidden_size; ++d) dh[static_cast<std::size_t>(d)] += g * w[d];
        if (dlm_head) {
          for (Index d = 0; d < hidden_size; ++d)
            dlm_head[v * hidden_size + d] += static_cast<float>(g * h[d]);
        }
      }
      if (dhidden) {
        for (Index d = 0; d < hidden_size; ++d)
          dhidden[r * hidden_size + d] += static_cast<float>(dh[static_cast<std::size_t>(d)]);
      }
    });
  }
  result.loss = nll / normalizer;
  return result;
}

}  // namespace qg::train
