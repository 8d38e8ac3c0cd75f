// The CPU reference backend: every Backend op in plain float32, written to be obviously right
// (it is the oracle the CUDA backend is tested against) and multi-threaded over independent
// rows so the test suite and tiny models stay fast.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/thread_pool.h"
#include "qinggeng/error.h"
#include "qinggeng/lora/lora_add.h"
#include "qinggeng/model/backend.h"
#include "qinggeng/model/rotary.h"

namespace qg::model {
namespace {

Tensor host_tensor(std::int64_t rows, std::int64_t cols) {
  std::shared_ptr<float[]> storage(new float[static_cast<std::size_t>(std::max<std::int64_t>(1, rows * cols))]);
  float* data = storage.get();
  return Tensor(DType::F32, Device::Cpu, rows, cols, std::shared_ptr<void>(storage, data), data);
}

void check_host_f32(const Tensor& t, const char* what) {
  QG_CHECK(t.device() == Device::Cpu && t.dtype() == DType::F32, "cpu backend: ", what,
           " must be a float32 host tensor");
}

void check_shape(const Tensor& t, std::int64_t rows, std::int64_t cols, const char* what) {
  QG_CHECK(t.rows() == rows && t.cols() == cols, "cpu backend: ", what, " is ", t.shape_string(),
           ", expected [", rows, ", ", cols, "]");
}

// Dot product with independent partial sums so the compiler can vectorise it.
float dot(const float* a, const float* b, std::int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/// Keys and values per layer, [token][head][head_dim], grown as tokens arrive.
class CpuKvCache final : public KvCache {
 public:
  CpuKvCache(int layers, const AttentionShape& shape, int capacity)
      : KvCache(capacity), row_(static_cast<std::size_t>(shape.num_heads) * shape.head_dim),
        keys_(layers), values_(layers) {}

  float* key(int layer, int token) { return slot(keys_, layer, token); }
  float* value(int layer, int token) { return slot(values_, layer, token); }

 private:
  float* slot(std::vector<std::vector<float>>& store, int layer, int token) {
    auto& v = store[static_cast<std::size_t>(layer)];
    const std::size_t need = (static_cast<std::size_t>(token) + 1) * row_;
    if (v.size() < need) v.resize(std::max(need, std::min(2 * v.size(), static_cast<std::size_t>(capacity()) * row_)));
    return v.data() + static_cast<std::size_t>(token) * row_;
  }
  std::size_t row_;
  std::vector<std::vector<float>> keys_, values_;
};

// Rotates one half (rot_dim values) of a head by `pos`, rotate_half style.
void rotate(float* x, int rot_dim, int pos, const std::vector<float>& inv_freq) {
  const int quarter = rot_dim / 2;
  for (int j = 0; j < quarter; ++j) {
    const float angle = static_cast<float>(pos) * inv_freq[static_cast<std::size_t>(j)];
    const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
    const float s = static_cast<float>(std::sin(static_cast<double>(angle)));
    const float x1 = x[j], x2 = x[j + quarter];
    x[j] = x1 * c - x2 * s;
    x[j + quarter] = x2 * c + x1 * s;
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::Cpu; }

  Tensor upload(const io::TensorView& w, std::int64_t rows, std::int64_t cols) override {
    QG_CHECK(w.numel() == rows * cols, "cpu backend: tensor '", w.name, "' has ", w.numel(),
             " elements, expected ", rows, " x ", cols);
    Tensor t = host_tensor(rows, cols);
    convert_to_f32(w.dtype, w.data, t.as<float>(), static_cast<std::size_t>(rows * cols));
    return t;
  }

  Tensor activation(std::int64_t rows, std::int64_t cols) override { return host_tensor(rows, cols); }

  std::unique_ptr<KvCache> new_kv_cache(int num_layers, const AttentionShape& shape,
                                        int capacity) override {
    return std::make_unique<CpuKvCache>(num_layers, shape, capacity);
  }

  void embedding(const Tensor& table, const std::vector<int>& ids, Tensor& out) override {
    check_host_f32(table, "embedding table");
    check_shape(out, static_cast<std::int64_t>(ids.size()), table.cols(), "embedding output");
    for (std::size_t i = 0; i < ids.size(); ++i) {
      QG_CHECK(ids[i] >= 0 && ids[i] < table.rows(), "token id ", ids[i], " outside [0, ",
               table.rows(), ")");
      std::memcpy(out.as<float>() + i * table.cols(), table.as<float>() + ids[i] * table.cols(),
                  sizeof(float) * static_cast<std::size_t>(table.cols()));
    }
  }

  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                  Tensor& out) override {
    const std::int64_t n = x.cols();
    check_shape(gamma, 1, n, "layer_norm gamma");
    check_shape(beta, 1, n, "layer_norm beta");
    check_shape(out, x.rows(), n, "layer_norm output");
    pool_.parallel_for(x.rows(), 1, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const float* in = x.as<float>() + r * n;
        double mean = 0, var = 0;
        for (std::int64_t i = 0; i < n; ++i) mean += in[i];
        mean /= static_cast<double>(n);
        for (std::int64_t i = 0; i < n; ++i) var += (in[i] - mean) * (in[i] - mean);
        var /= static_cast<double>(n);
        const double inv = 1.0 / std::sqrt(var + eps);
        float* o = out.as<float>() + r * n;
        for (std::int64_t i = 0; i < n; ++i) {
          o[i] = static_cast<float>((in[i] - mean) * inv) * gamma.as<float>()[i] + beta.as<float>()[i];
        }
      }
    });
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    const std::int64_t T = x.rows(), K = x.cols(), O = w.rows();
    check_shape(w, O, K, "linear weight");
    check_shape(out, T, O, "linear output");
    if (!bias.empty()) check_shape(bias, 1, O, "linear bias");
    // Parallel over output features: each weight row is read once for all tokens.
    pool_.parallel_for(O, 16, [&](std::int64_t o0, std::int64_t o1) {
      for (std::int64_t o = o0; o < o1; ++o) {
        const float* wr = w.as<float>() + o * K;
        const float b = bias.empty() ? 0.0f : bias.as<float>()[o];
        for (std::int64_t t = 0; t < T; ++t) {
          out.as<float>()[t * O + o] = dot(x.as<float>() + t * K, wr, K) + b;
        }
      }
    });
  }

  void gelu(Tensor& x) override {
    pool_.parallel_for(x.numel(), 4096, [&](std::int64_t i0, std::int64_t i1) {
      float* v = x.as<float>();
      for (std::int64_t i = i0; i < i1; ++i) {
        const float u = v[i];
        v[i] = 0.5f * u * (1.0f + std::tanh(0.7978845608028654f * u * (1.0f + 0.044715f * u * u)));
      }
    });
  }

  void scaled_add(const Tensor& a, float alpha, const Tensor& b, Tensor& out) override {
    check_shape(b, a.rows(), a.cols(), "scaled_add b");
    check_shape(out, a.rows(), a.cols(), "scaled_add output");
    const float* pa = a.as<float>();
    const float* pb = b.as<float>();
    float* po = out.as<float>();
    for (std::int64_t i = 0; i < a.numel(); ++i) po[i] = pa[i] * alpha + pb[i];
  }

  void attention(const Tensor& qkv, const std::vector<SequenceChunk>& batch, int layer,
                 const AttentionShape& shape, Tensor& out) override {
    const int nh = shape.num_heads, hd = shape.head_dim, half = hd / 2;
    const std::int64_t H = static_cast<std::int64_t>(nh) * hd;
    check_shape(qkv, qkv.rows(), 3 * H, "attention qkv");
    check_shape(out, qkv.rows(), H, "attention output");
    if (inv_freq_.size() != static_cast<std::size_t>(half / 2)) inv_freq_ = glm_rotary_inv_freq(half);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

    std::int64_t row0 = 0;
    for (const auto& chunk : batch) {
      auto& cache = static_cast<CpuKvCache&>(*chunk.cache);
      const int past = cache.length();
      const int n = static_cast<int>(chunk.tokens.size());
      // Rotate q (into a scratch copy) and k, and store k, v in the cache.
      std::vector<float> q(static_cast<std::size_t>(n) * H);
      for (int i = 0; i < n; ++i) {
        const float* src = qkv.as<float>() + (row0 + i) * 3 * H;
        float* k = cache.key(layer, past + i);
        float* v = cache.value(layer, past + i);
        for (int h = 0; h < nh; ++h) {
          float* qh = q.data() + static_cast<std::size_t>(i) * H + h * hd;
          std::memcpy(qh, src + h * 3 * hd, sizeof(float) * hd);
          std::memcpy(k + h * hd, src + h * 3 * hd + hd, sizeof(float) * hd);
          std::memcpy(v + h * hd, src + h * 3 * hd + 2 * hd, sizeof(float) * hd);
          for (float* x : {qh, k + h * hd}) {
            rotate(x, half, chunk.positions[i], inv_freq_);
            rotate(x + half, half, chunk.block_positions[i], inv_freq_);
          }
        }
      }
      // softmax(q k^T * scale + mask) v for every (new token, head).
      pool_.parallel_for(static_cast<std::int64_t>(n) * nh, 1, [&](std::int64_t p0, std::int64_t p1) {
        std::vector<float> scores(static_cast<std::size_t>(past + n));
        for (std::int64_t p = p0; p < p1; ++p) {
          const int i = static_cast<int>(p / nh), h = static_cast<int>(p % nh);
          const int query = past + i;
          const float* qh = q.data() + static_cast<std::size_t>(i) * H + h * hd;
          // Every key below max(query + 1, ctx) is visible (spec section 2), none above.
          const int keys = std::min(past + n, std::max(query + 1, chunk.context_length));
          float max_score = -INFINITY;
          for (int j = 0; j < keys; ++j) {
            scores[j] = dot(qh, cache.key(layer, j) + h * hd, hd) * scale;
            max_score = std::max(max_score, scores[j]);
          }
          double total = 0;
          for (int j = 0; j < keys; ++j) {
            scores[j] = std::exp(scores[j] - max_score);
            total += scores[j];
          }
          float* o = out.as<float>() + (row0 + i) * H + h * hd;
          std::fill(o, o + hd, 0.0f);
          for (int j = 0; j < keys; ++j) {
            const float pj = static_cast<float>(scores[j] / total);
            const float* vj = cache.value(layer, j) + h * hd;
            for (int d = 0; d < hd; ++d) o[d] += pj * vj[d];
          }
        }
      });
      row0 += n;
    }
    QG_CHECK(row0 == qkv.rows(), "cpu backend: attention batch covers ", row0, " rows of ",
             qkv.rows());
  }

  void load_adapter(int id, const lora::LoraAdapter& adapter) override {
    QG_CHECK(id >= 0, "LoRA adapter id must be non-negative, got ", id);
    if (adapters_.size() <= static_cast<std::size_t>(id)) adapters_.resize(static_cast<std::size_t>(id) + 1);
    adapters_[static_cast<std::size_t>(id)] = std::make_unique<lora::LoraAdapter>(adapter);
  }

  void begin_forward(const std::vector<SequenceChunk>& batch) override {
    row_adapter_.clear();
    for (const auto& chunk : batch) {
      QG_CHECK(chunk.adapter < 0 || (static_cast<std::size_t>(chunk.adapter) < adapters_.size() &&
                                     adapters_[static_cast<std::size_t>(chunk.adapter)]),
               "LoRA adapter ", chunk.adapter, " is not loaded");
      row_adapter_.insert(row_adapter_.end(), chunk.tokens.size(), chunk.adapter);
    }
  }

  void lora_add(const Tensor& x, Tensor& y, int layer, lora::LoraTarget target) override {
    std::vector<lora::LoraFactors> factors(adapters_.size());
    std::vector<std::int32_t> rows(row_adapter_.size(), -1);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const int id = row_adapter_[r];
      if (id < 0 || !adapters_[static_cast<std::size_t>(id)]->has(layer, target)) continue;
      rows[r] = id;
      if (factors[static_cast<std::size_t>(id)].a == nullptr) {
        factors[static_cast<std::size_t>(id)] = adapters_[static_cast<std::size_t>(id)]->factors(layer, target);
      }
    }
    lora::lora_add(x.as<float>(), x.rows(), x.cols(), y.as<float>(), y.cols(), factors, rows.data());
  }

  void gather_rows(const Tensor& x, const std::vector<std::int64_t>& rows, Tensor& out) override {
    check_shape(out, static_cast<std::int64_t>(rows.size()), x.cols(), "gather_rows output");
    for (std::size_t r = 0; r < rows.size(); ++r) {
      std::memcpy(out.as<float>() + r * x.cols(), x.as<float>() + rows[r] * x.cols(),
                  sizeof(float) * static_cast<std::size_t>(x.cols()));
    }
  }

  void to_host(const Tensor& t, float* out) override {
    check_host_f32(t, "to_host source");
    std::memcpy(out, t.data(), t.nbytes());
  }

 private:
  cpu::ThreadPool pool_;
  std::vector<float> inv_freq_;
  std::vector<std::unique_ptr<lora::LoraAdapter>> adapters_;  // by id
  std::vector<int> row_adapter_;                              // of the current forward
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace qg::model
