// The GPU LoRA training step (include/qinggeng/train/cuda_model_grad.h): weights uploaded
// through the CUDA backend, activations in one arena sized for the largest micro-batch seen,
// every op one of the kernels of lib/cuda (gemm_f16 / gemm_f16_nn, layer_norm_forward_stats /
// layer_norm_backward, glm_rotary_qkv, attention_train_forward / _backward, lora_train_*,
// gelu, cross_entropy_train), all on one stream.
#include "qinggeng/train/cuda_model_grad.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>
#include <tuple>

#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/op_profiler.h"
#include "qinggeng/cuda/attention_train.h"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/cuda/device.h"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/glm_layout.h"
#include "qinggeng/train/trainable_model.h"

namespace qg::train {

using lora::LoraTarget;
using Index = std::int64_t;

namespace {

constexpr int kTargets = 4;

const std::uint16_t* bits(const __half* p) { return reinterpret_cast<const std::uint16_t*>(p); }
const __half* half_ptr(const Tensor& t) { return static_cast<const __half*>(t.data()); }

double gib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024 * 1024); }

/// Owned device memory (cudaMalloc), grown on demand.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() { release(); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  /// At least `bytes` (contents are lost when it grows). \throws qg::Error when out of memory.
  void reserve(std::size_t bytes, const char* what) {
    if (bytes <= bytes_) return;
    release();
    const cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      ptr_ = nullptr;
      std::size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      fail("CudaModelGrad: out of GPU memory allocating ", gib(bytes), " GiB for ", what, " (",
           gib(free_bytes), " GiB free of ", gib(total),
           " GiB); use shorter or fewer sequences per micro-batch, or --checkpoint-layers");
    }
    bytes_ = bytes;
  }
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  char* data() const { return static_cast<char*>(ptr_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Hands out 256-byte aligned pieces of an arena; with a null base it only measures.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <class T>
  T* take(Index count) {
    offset_ = (offset_ + 255) / 256 * 256;
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + offset_);
    offset_ += static_cast<std::size_t>(count) * sizeof(T);
    return p;
  }
  std::size_t used() const { return offset_; }

 private:
  char* base_;
  std::size_t offset_ = 0;
};

/// What one layer's backward reads from its forward.
struct LayerActs {
  __half *a = nullptr, *qkv = nullptr, *attn = nullptr, *h = nullptr, *m = nullptr,
         *f = nullptr;
  float *mean1 = nullptr, *rstd1 = nullptr, *mean2 = nullptr, *rstd2 = nullptr, *lse = nullptr;
  std::array<float*, kTargets> u{};  // dropout(x) A^T per adapted target
};

struct LayerWeights {
  Tensor ln1_w, ln1_b, qkv_w, qkv_b, dense_w, dense_b, ln2_w, ln2_b, w1, b1, w2, b2;
};

/// One adapted linear's fp32 factors and gradients (offsets into the factor arena, floats).
struct LoraSlot {
  bool present = false;
  Index in = 0, out = 0;
  std::size_t a = 0, b = 0, da = 0, db = 0;
};

}  // namespace

std::string CudaTrainMemoryPlan::to_string() const {
  char line[256];
  std::snprintf(line, sizeof line,
                "weights %.2f GiB + LoRA %.3f GiB + activations %.2f GiB + workspace %.2f GiB = "
                "%.2f GiB",
                gib(weights), gib(lora), gib(activations), gib(workspace), gib(total()));
  return line;
}

struct CudaModelGrad::Impl {
  io::ModelConfig config;
  CudaGradOptions options;
  lora::LoraConfig lora_config;
  int device = 0;
  std::shared_ptr<model::Backend> backend;  // owns the weight tensors' memory
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::OpProfiler> profiler;  // QG_CUDA_PROFILE=1: per-op times at exit

  Tensor embeddings, lm_head, final_w, final_b;
  std::vector<LayerWeights> layers;

  // LoRA factors and gradients: one fp32 arena [A, B per slot | dA, dB per slot].
  std::vector<std::array<LoraSlot, kTargets>> slots;
  std::vector<std::string> names;
  std::map<std::string, std::pair<std::size_t, std::size_t>> name_offset;  // float offset, n
  std::size_t factor_floats = 0;
  DeviceMemory lora_memory;

  // Per-batch arena.
  DeviceMemory arena;
  Index capacity = 0;  // tokens the arena is carved for
  std::vector<__half*> xs;          // layer inputs [L + 1][T, H] (xs[L]: last layer output)
  std::vector<LayerActs> acts;      // [L], or one scratch set with checkpointing
  __half *g = nullptr, *normed = nullptr, *dout = nullptr, *dm = nullptr, *dg = nullptr,
         *dh = nullptr, *dattn = nullptr, *dqkv = nullptr, *da = nullptr;
  float *mean_f = nullptr, *rstd_f = nullptr, *row_nll = nullptr;
  // positions, block positions, ids, row positions [T each], row_start [B + 1], context
  // lengths [B], labelled rows' targets and row positions [<= T each]
  int* meta = nullptr;
  std::uint64_t* d_row_seed = nullptr;  // [T] LoRA dropout: seeds[e] * 0x9E3779B97F4A7C15
  std::int64_t* d_labelled_rows = nullptr;  // [<= T] the rows the cross-entropy computes
  // options.last_layer_labelled_rows: the last layer's attention output and LayerNorm output
  // on the labelled rows [T, H], and those rows' dropout seeds [T]
  __half *attn_labelled = nullptr, *a_labelled = nullptr;
  std::uint64_t* d_labelled_row_seed = nullptr;
  void* lora_ws = nullptr;
  __half *lora_u16 = nullptr, *lora_v16 = nullptr;  // the forward GEMMs' low-rank operands
  void* attn_ws = nullptr;
  void* ce_ws = nullptr;
  std::size_t lora_ws_bytes = 0, attn_ws_bytes = 0, ce_ws_bytes = 0;

  // The current batch.
  std::vector<int> row_start;  // [B + 1]
  std::vector<int> labelled_example;  // the example of each labelled row, in row order
  cuda::TrainAttentionBatch attention;
  int *d_positions = nullptr, *d_block_positions = nullptr, *d_ids = nullptr;
  std::int32_t* d_row_position = nullptr;  // LoRA dropout: the row within its example
  int* d_labelled_targets = nullptr;
  std::int32_t* d_labelled_row_position = nullptr;  // the labelled rows' d_row_position
  bool dropout = true;

  Index H() const { return config.hidden_size; }
  Index I() const { return config.inner_hidden_size; }
  int heads() const { return static_cast<int>(config.num_attention_heads); }
  int head_dim() const { return static_cast<int>(config.head_dim()); }
  int L() const { return static_cast<int>(config.num_layers); }

  ~Impl() {
    profiler.reset();
    arena.release();
    lora_memory.release();
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  float* factors() const { return reinterpret_cast<float*>(lora_memory.data()); }

  /// Runs `launch` under a profiler scope named `name` (nothing extra when profiling is off).
  template <class Fn>
  void timed(const char* name, Fn&& launch) {
    if (!profiler || !profiler->enabled()) return launch();
    const auto scope = profiler->scope(name);
    launch();
  }

  // ---- memory ----

  // Carves (or, with a null base, measures) the arena for `T` tokens; returns its bytes.
  std::size_t carve(char* base, Index T) {
    Carver c(base);
    const bool ckpt = options.checkpoint_layers;
    xs.assign(static_cast<std::size_t>(L() + 1), nullptr);
    for (auto& x : xs) x = c.take<__half>(T * H());
    acts.assign(ckpt ? 1 : static_cast<std::size_t>(L()), LayerActs{});
    for (std::size_t l = 0; l < acts.size(); ++l) {
      LayerActs& s = acts[l];
      s.a = c.take<__half>(T * H());
      s.qkv = c.take<__half>(T * 3 * H());
      s.attn = c.take<__half>(T * H());
      s.h = c.take<__half>(T * H());
      s.m = c.take<__half>(T * H());
      s.f = c.take<__half>(T * I());
      s.mean1 = c.take<float>(T);
      s.rstd1 = c.take<float>(T);
      s.mean2 = c.take<float>(T);
      s.rstd2 = c.take<float>(T);
      s.lse = c.take<float>(T * heads());
      for (int t = 0; t < kTargets; ++t) {
        if (adapts(ckpt ? -1 : static_cast<int>(l), t)) s.u[t] = c.take<float>(T * lora_config.r);
      }
    }
    g = c.take<__half>(T * I());
    dg = c.take<__half>(T * I());
    normed = c.take<__half>(T * H());
    dout = c.take<__half>(T * H());
    dm = c.take<__half>(T * H());
    dh = c.take<__half>(T * H());
    dattn = c.take<__half>(T * H());
    da = c.take<__half>(T * H());
    dqkv = c.take<__half>(T * 3 * H());
    mean_f = c.take<float>(T);
    rstd_f = c.take<float>(T);
    row_nll = c.take<float>(T);
    meta = c.take<int>(6 * T + 2 * (T + 1));  // B <= T
    d_row_seed = c.take<std::uint64_t>(T);
    d_labelled_rows = c.take<std::int64_t>(T);
    if (options.last_layer_labelled_rows) {
      attn_labelled = c.take<__half>(T * H());
      a_labelled = c.take<__half>(T * H());
      d_labelled_row_seed = c.take<std::uint64_t>(T);
    }
    lora_ws_bytes = 0;
    Index widest_out = 0;
    for (LoraTarget t : lora::kLoraTargets) {
      const auto [in, out] = lora::target_features(t, config);
      widest_out = std::max<Index>(widest_out, out);
      cuda::LoraTrainShape shape;
      shape.tokens = T;
      shape.in = in;
      shape.out = out;
      shape.rank = lora_config.r;
      lora_ws_bytes = std::max(lora_ws_bytes, cuda::lora_train_workspace_bytes(shape));
    }
    lora_ws = c.take<char>(static_cast<Index>(lora_ws_bytes));
    if (options.lora_in_gemm) {
      const Index lr_width = cuda::lora_train_low_rank_width(lora_config.r);
      lora_u16 = c.take<__half>(T * lr_width);
      lora_v16 = c.take<__half>(widest_out * lr_width);
    }
    attn_ws_bytes =
        cuda::attention_train_backward_workspace_bytes(static_cast<int>(T), heads(), head_dim());
    attn_ws = c.take<char>(static_cast<Index>(attn_ws_bytes));
    ce_ws_bytes = cuda::cross_entropy_train_workspace_bytes(T, config.vocab_size, ce_options());
    ce_ws = c.take<char>(static_cast<Index>(ce_ws_bytes));
    return c.used();
  }

  // Bytes of the kept activations alone (the rest of the arena is workspace).
  std::size_t activation_bytes(Index T) const {
    const std::size_t h2 = static_cast<std::size_t>(T * H()) * 2;
    std::size_t layer = 7 * h2 + static_cast<std::size_t>(T * I()) * 2 +
                        static_cast<std::size_t>(T) * 4 * (4 + heads());
    for (int t = 0; t < kTargets; ++t) {
      if (adapts(-1, t)) layer += static_cast<std::size_t>(T * lora_config.r) * 4;
    }
    const std::size_t inputs = static_cast<std::size_t>(L() + 1) * h2;
    const std::size_t labelled = options.last_layer_labelled_rows ? 2 * h2 : 0;
    return inputs + labelled +
           (options.checkpoint_layers ? 1 : static_cast<std::size_t>(L())) * layer;
  }

  cuda::CrossEntropyTrainOptions ce_options() const {
    cuda::CrossEntropyTrainOptions o;
    o.row_chunk = options.ce_row_chunk;
    return o;
  }

  void reserve_tokens(Index T) {
    if (T <= capacity) return;
    arena.reserve(carve(nullptr, T), "training activations");
    carve(arena.data(), T);
    capacity = T;
  }

  // ---- LoRA ----

  // Whether target t is adapted in `layer` (-1: in any layer).
  bool adapts(int layer, int t) const {
    if (layer >= 0) return slots[static_cast<std::size_t>(layer)][t].present;
    for (const auto& s : slots) {
      if (s[t].present) return true;
    }
    return false;
  }

  // Whether `layer` runs its part after the attention on the labelled rows only
  // (options.last_layer_labelled_rows; not when every row, or none, is labelled).
  bool labelled_rows_only(int layer) const {
    const auto n = static_cast<Index>(labelled_example.size());
    return options.last_layer_labelled_rows && layer == L() - 1 && n > 0 && n < row_start.back();
  }

  // Rows of `layer`'s part after the attention (dense, LayerNorm 2, MLP): the labelled rows,
  // gathered in row order, or all of them.
  Index rows_after_attention(int layer) const {
    return labelled_rows_only(layer) ? static_cast<Index>(labelled_example.size())
                                     : row_start.back();
  }

  // The lowest adapted (layer, target): the layer, and the target's index in the layer's
  // forward order (0 query_key_value .. 3 dense_4h_to_h). The backward ends there.
  std::pair<int, int> lowest_adapted() const {
    for (int l = 0; l < L(); ++l) {
      for (int t = 0; t < kTargets; ++t) {
        if (slots[static_cast<std::size_t>(l)][t].present) return {l, t};
      }
    }
    return {0, 0};  // unreachable: an adapter without factors is refused at construction
  }

  /// Target t of `layer` over the whole packed batch: each example keeps ModelGrad's mask
  /// stream (seed of example e: seeds[e] * 0x9E3779B97F4A7C15 + layer * 4 + t + 1, drawn
  /// with the row index inside the example), through the per-row arrays of begin_batch.
  cuda::LoraTrainShape lora_shape(int layer, int t) const {
    const LoraSlot& s = slots[static_cast<std::size_t>(layer)][t];
    // Targets after the attention see rows_after_attention(layer) rows.
    const bool labelled = t > 0 && labelled_rows_only(layer);
    cuda::LoraTrainShape shape;
    shape.tokens = t > 0 ? rows_after_attention(layer) : row_start.back();
    shape.in = s.in;
    shape.out = s.out;
    shape.rank = lora_config.r;
    shape.scale = static_cast<float>(lora_config.scale());
    shape.dropout = dropout ? static_cast<float>(lora_config.lora_dropout) : 0.0f;
    shape.seed = static_cast<std::uint64_t>(layer * 4 + t + 1);
    shape.row_seed = labelled ? d_labelled_row_seed : d_row_seed;
    shape.row_position = labelled ? d_labelled_row_position : d_row_position;
    shape.kernels = options.lora_tensor_cores ? cuda::LoraTrainKernels::TensorCores
                                              : cuda::LoraTrainKernels::Auto;
    return shape;
  }

  // Target t's LoRA term as the base GEMM's low-rank term (options.lora_in_gemm; none where
  // t is not adapted): writes u = dropout(x) A^T (kept for the backward) and the GEMM's fp16
  // operands.
  cuda::GemmLowRank lora_term(int layer, int t, const __half* x, float* u) {
    const LoraSlot& s = slots[static_cast<std::size_t>(layer)][t];
    if (!s.present || !options.lora_in_gemm) return {};
    cuda::lora_train_shrink(x, factors() + s.a, factors() + s.b, lora_shape(layer, t), u, lora_u16,
                            lora_v16, lora_ws, lora_ws_bytes, stream);
    return {bits(lora_u16), bits(lora_v16), cuda::lora_train_low_rank_width(lora_config.r)};
  }

  // y += lora(x) for target t of `layer` as a pass of its own (without options.lora_in_gemm).
  void lora_forward(int layer, int t, const __half* x, __half* y, float* u) {
    const LoraSlot& s = slots[static_cast<std::size_t>(layer)][t];
    if (!s.present || options.lora_in_gemm) return;
    cuda::lora_train_forward(x, factors() + s.a, factors() + s.b, lora_shape(layer, t), y, u,
                             lora_ws, lora_ws_bytes, stream);
  }

  void lora_backward(int layer, int t, const __half* x, const float* u, const __half* dy,
                     __half* dx) {
    const LoraSlot& s = slots[static_cast<std::size_t>(layer)][t];
    if (!s.present) return;
    cuda::lora_train_backward(x, factors() + s.a, factors() + s.b, u, dy, lora_shape(layer, t),
                              dx, factors() + s.da, factors() + s.db, lora_ws, lora_ws_bytes,
                              stream);
  }

  // ---- batch ----

  // Validates and uploads the batch's layout; returns its token count.
  Index begin_batch(const std::vector<const TrainingExample*>& batch,
                    const std::vector<std::uint64_t>& dropout_seeds) {
    QG_CHECK(!batch.empty(), "CudaModelGrad: empty batch");
    QG_CHECK(dropout_seeds.size() == batch.size(), "CudaModelGrad: ", dropout_seeds.size(),
             " dropout seeds for ", batch.size(), " examples");
    row_start.assign(1, 0);
    // Per row: positions, block positions, ids, the row within its example (LoRA dropout) and
    // its example's dropout seed; per labelled row: the row, its target and its example.
    std::vector<int> positions, block_positions, ids, row_position, context, labelled_targets,
        labelled_position;
    std::vector<std::uint64_t> row_seed, labelled_seed;
    std::vector<std::int64_t> labelled_rows;
    labelled_example.clear();
    int longest = 0;
    for (std::size_t k = 0; k < batch.size(); ++k) {
      const TrainingExample& e = *batch[k];
      check_training_example(e, config);
      const int n = e.size();
      const text::GlmLayout layout{e.context_length, e.mask_position};
      const std::vector<int> next = e.next_token_targets();
      for (int t = 0; t < n; ++t) {
        positions.push_back(layout.position(t));
        block_positions.push_back(layout.block_position(t));
        row_position.push_back(t);
        row_seed.push_back(dropout_seeds[k] * 0x9E3779B97F4A7C15ull);  // ModelGrad's stream
        if (next[static_cast<std::size_t>(t)] == train::kIgnoreLabel) continue;
        labelled_rows.push_back(row_start.back() + t);
        labelled_targets.push_back(next[static_cast<std::size_t>(t)]);
        labelled_example.push_back(static_cast<int>(k));
        labelled_position.push_back(t);
        labelled_seed.push_back(row_seed.back());
      }
      ids.insert(ids.end(), e.input_ids.begin(), e.input_ids.end());
      context.push_back(e.context_length);
      row_start.push_back(row_start.back() + n);
      longest = std::max(longest, n);
    }
    const Index T = row_start.back();
    reserve_tokens(T);
    std::vector<int> packed;  // meta's layout (carve)
    for (const auto* part : {&positions, &block_positions, &ids, &row_position, &row_start,
                             &context, &labelled_targets, &labelled_position}) {
      packed.insert(packed.end(), part->begin(), part->end());
    }
    QG_CUDA_CHECK(cudaMemcpyAsync(meta, packed.data(), packed.size() * sizeof(int),
                                  cudaMemcpyHostToDevice, stream));
    QG_CUDA_CHECK(cudaMemcpyAsync(d_row_seed, row_seed.data(),
                                  row_seed.size() * sizeof(std::uint64_t), cudaMemcpyHostToDevice,
                                  stream));
    QG_CUDA_CHECK(cudaMemcpyAsync(d_labelled_rows, labelled_rows.data(),
                                  labelled_rows.size() * sizeof(std::int64_t),
                                  cudaMemcpyHostToDevice, stream));
    if (d_labelled_row_seed != nullptr) {
      QG_CUDA_CHECK(cudaMemcpyAsync(d_labelled_row_seed, labelled_seed.data(),
                                    labelled_seed.size() * sizeof(std::uint64_t),
                                    cudaMemcpyHostToDevice, stream));
    }
    const auto B = static_cast<Index>(batch.size());
    d_positions = meta;
    d_block_positions = meta + T;
    d_ids = meta + 2 * T;
    d_row_position = meta + 3 * T;
    attention.num_seqs = static_cast<int>(B);
    attention.total_tokens = static_cast<int>(T);
    attention.max_seq_len = longest;
    attention.row_start = meta + 4 * T;
    attention.context_length = meta + 4 * T + B + 1;
    d_labelled_targets = meta + 4 * T + 2 * B + 1;
    d_labelled_row_position = d_labelled_targets + labelled_targets.size();
    // The host vectors are pageable: each copy has completed when cudaMemcpyAsync returns.
    return T;
  }

  // ---- forward ----

  LayerActs& acts_of(int layer) {
    return acts[options.checkpoint_layers ? 0 : static_cast<std::size_t>(layer)];
  }

  void layer_forward(int l, const __half* x, LayerActs& s, __half* out) {
    const Index T = row_start.back();
    const LayerWeights& w = layers[static_cast<std::size_t>(l)];
    const float eps = static_cast<float>(config.layernorm_epsilon);
    const float alpha = static_cast<float>(model::kGlmResidualAlpha);
    using Kind = cuda::GemmEpilogue::Kind;
    auto bias = [](const Tensor& b) {
      cuda::GemmEpilogue e;
      e.kind = Kind::Bias;
      e.bias = static_cast<const std::uint16_t*>(b.data());
      return e;
    };
    auto residual = [&](const Tensor& b, const __half* r) {
      cuda::GemmEpilogue e = bias(b);
      e.kind = Kind::BiasResidual;
      e.residual = bits(r);
      e.alpha = alpha;
      return e;
    };
    // y [M, N] = epilogue(in W^T) + target t's LoRA term, inside the GEMM or after it.
    auto gemm = [&](int t, Index M, const __half* in, float* u, const Tensor& weight, __half* y,
                    Index N, Index K, const cuda::GemmEpilogue& e) {
      cuda::GemmLowRank lora;
      if (options.lora_in_gemm) timed("fwd lora", [&] { lora = lora_term(l, t, in, u); });
      timed("fwd gemm", [&] {
        cuda::gemm_f16(bits(in), static_cast<const std::uint16_t*>(weight.data()), y, false, M, N,
                       K, e, lora, stream);
      });
      if (!options.lora_in_gemm) timed("fwd lora", [&] { lora_forward(l, t, in, y, u); });
    };

    timed("fwd layernorm", [&] {
      cuda::layer_norm_forward_stats(x, half_ptr(w.ln1_w), half_ptr(w.ln1_b), eps, T, H(), s.a,
                                     s.mean1, s.rstd1, stream);
    });
    gemm(0, T, s.a, s.u[0], w.qkv_w, s.qkv, 3 * H(), H(), bias(w.qkv_b));
    timed("rotary", [&] {
      cuda::glm_rotary_qkv(s.qkv, T, heads(), head_dim(), d_positions, d_block_positions, false,
                           stream);
    });
    timed("fwd attention", [&] {
      cuda::attention_train_forward(s.qkv, attention, heads(), head_dim(), s.attn, s.lse, stream);
    });
    // From here on, rows R: all, or the labelled ones gathered (labelled_rows_only).
    const Index R = rows_after_attention(l);
    const __half* attn = s.attn;
    const __half* a = s.a;
    if (labelled_rows_only(l)) {
      timed("gather rows", [&] {
        cuda::gather_rows(s.attn, T, H(), d_labelled_rows, R, attn_labelled, stream);
        cuda::gather_rows(s.a, T, H(), d_labelled_rows, R, a_labelled, stream);
      });
      attn = attn_labelled;
      a = a_labelled;
    }
    gemm(1, R, attn, s.u[1], w.dense_w, s.h, H(), H(), residual(w.dense_b, a));
    timed("fwd layernorm", [&] {
      cuda::layer_norm_forward_stats(s.h, half_ptr(w.ln2_w), half_ptr(w.ln2_b), eps, R, H(), s.m,
                                     s.mean2, s.rstd2, stream);
    });
    gemm(2, R, s.m, s.u[2], w.w1, s.f, I(), H(), bias(w.b1));
    timed("gelu", [&] { cuda::gelu_tanh_out(s.f, R * I(), g, stream); });
    gemm(3, R, g, s.u[3], w.w2, out, H(), I(), residual(w.b2, s.m));
  }

  // Every layer, the final norm and the cross-entropy; with `backward` the gradient of the
  // normed hidden states goes to dm. The cross-entropy runs on the labelled rows only (the
  // prompt's rows have no loss and a zero gradient), gathered into the `da` scratch with its
  // gradient in `dattn` (both free until the backward's last layer); row NLLs go to row_nll,
  // one per labelled row.
  void forward(bool backward, float loss_scale, double normalizer) {
    const Index T = row_start.back();
    cuda::embedding(half_ptr(embeddings), config.vocab_size, H(), d_ids, T, xs[0], stream);
    for (int l = 0; l < L(); ++l) {
      layer_forward(l, xs[static_cast<std::size_t>(l)], acts_of(l),
                    xs[static_cast<std::size_t>(l) + 1]);
    }
    // The last layer's output rows: all, or the labelled ones already gathered.
    const Index R = rows_after_attention(L() - 1);
    cuda::layer_norm_forward_stats(xs[static_cast<std::size_t>(L())], half_ptr(final_w),
                                   half_ptr(final_b), static_cast<float>(config.layernorm_epsilon),
                                   R, H(), normed, mean_f, rstd_f, stream);
    const auto n = static_cast<Index>(labelled_example.size());
    cuda::CrossEntropyTrainOptions ce = ce_options();
    ce.normalizer = normalizer;
    ce.grad_scale = loss_scale;
    timed("cross-entropy", [&] {
      if (R < T) {  // normed holds the labelled rows in order: dnormed is all of dm's R rows
        cuda::cross_entropy_train(normed, half_ptr(lm_head), d_labelled_targets, n, H(),
                                  config.vocab_size, ce, row_nll, backward ? dm : nullptr, nullptr,
                                  ce_ws, ce_ws_bytes, stream);
        return;
      }
      if (backward) {
        QG_CUDA_CHECK(cudaMemsetAsync(dm, 0, static_cast<std::size_t>(T * H()) * 2, stream));
      }
      if (n == 0) return;
      cuda::gather_rows(normed, T, H(), d_labelled_rows, n, da, stream);
      cuda::cross_entropy_train(da, half_ptr(lm_head), d_labelled_targets, n, H(),
                                config.vocab_size, ce, row_nll, backward ? dattn : nullptr,
                                nullptr, ce_ws, ce_ws_bytes, stream);
      if (backward) cuda::scatter_rows(dattn, n, H(), d_labelled_rows, dm, T, stream);
    });
  }

  // ---- backward ----

  // `lowest`: lowest_adapted(), where the backward ends.
  void layer_backward(int l, std::pair<int, int> lowest) {
    const Index T = row_start.back();
    const LayerWeights& w = layers[static_cast<std::size_t>(l)];
    const float alpha = static_cast<float>(model::kGlmResidualAlpha);
    const __half* x = xs[static_cast<std::size_t>(l)];
    LayerActs& s = acts_of(l);
    // With checkpointing, recompute this layer's activations (its output goes to scratch).
    if (options.checkpoint_layers) layer_forward(l, x, s, dh);
    // dx [M, K] = dy [M, N] W (+ alpha res)
    auto nn = [&](Index M, const __half* dy, const Tensor& weight, __half* dx, Index N, Index K,
                  const __half* res) {
      cuda::GemmNnEpilogue e;
      e.residual = res == nullptr ? nullptr : bits(res);
      e.alpha = alpha;
      cuda::gemm_f16_nn(bits(dy), static_cast<const std::uint16_t*>(weight.data()), dx, false, M, N,
                        K, e, stream);
    };

    // In the lowest adapted layer the backward ends with its first adapted target: nothing
    // below it is trained (the embeddings are frozen), so that target's dx and every gradient
    // under it are skipped. last(t): target t is where this layer's backward ends.
    auto last = [&](int t) { return l == lowest.first && t == lowest.second; };
    // The part after the attention has R rows (layer_forward); with the labelled rows only,
    // dh and dattn are formed compact in da and dqkv (free until the attention backward) and
    // scattered into zeroed full-height gradients.
    const Index R = rows_after_attention(l);
    const bool gathered = labelled_rows_only(l);
    __half* dh_rows = gathered ? da : dh;
    __half* dattn_rows = gathered ? dqkv : dattn;

    // x' = m * alpha + gelu(f) W2^T + b2 + lora(g)         (dout holds dx')
    if (!last(3)) timed("bwd gemm_nn", [&] { nn(R, dout, w.w2, dg, I(), H(), nullptr); });
    if (slots[static_cast<std::size_t>(l)][3].present) {
      timed("gelu", [&] { cuda::gelu_tanh_out(s.f, R * I(), g, stream); });
      timed("bwd lora", [&] { lora_backward(l, 3, g, s.u[3], dout, last(3) ? nullptr : dg); });
    }
    if (last(3)) return;
    timed("gelu", [&] { cuda::gelu_tanh_backward(s.f, dg, R * I(), dg, stream); });  // df
    if (!last(2))
      timed("bwd gemm_nn", [&] { nn(R, dg, w.w1, dm, H(), I(), dout); });  // + alpha dout
    timed("bwd lora", [&] { lora_backward(l, 2, s.m, s.u[2], dg, last(2) ? nullptr : dm); });
    if (last(2)) return;
    // m = LN2(h)
    timed("bwd layernorm", [&] {
      cuda::layer_norm_backward(s.h, half_ptr(w.ln2_w), s.mean2, s.rstd2, dm, R, H(), dh_rows,
                                nullptr, nullptr, stream);
    });
    // h = a * alpha + attn Wd^T + bd + lora(attn)
    if (!last(1)) {
      timed("bwd gemm_nn", [&] { nn(R, dh_rows, w.dense_w, dattn_rows, H(), H(), nullptr); });
    }
    timed("bwd lora", [&] {
      lora_backward(l, 1, gathered ? attn_labelled : s.attn, s.u[1], dh_rows,
                    last(1) ? nullptr : dattn_rows);
    });
    if (last(1)) return;
    if (gathered) {
      timed("scatter rows", [&] {
        const std::size_t bytes = static_cast<std::size_t>(T * H()) * 2;
        QG_CUDA_CHECK(cudaMemsetAsync(dh, 0, bytes, stream));
        QG_CUDA_CHECK(cudaMemsetAsync(dattn, 0, bytes, stream));
        cuda::scatter_rows(dh_rows, R, H(), d_labelled_rows, dh, T, stream);
        cuda::scatter_rows(dattn_rows, R, H(), d_labelled_rows, dattn, T, stream);
      });
    }
    const bool fused_rotary = options.rotary_in_attention_backward;
    timed("bwd attention", [&] {
      cuda::TrainRotaryPositions inverse_rotary;
      if (fused_rotary) inverse_rotary = {d_positions, d_block_positions};
      cuda::attention_train_backward(s.qkv, s.attn, s.lse, dattn, attention, heads(), head_dim(),
                                     dqkv, attn_ws, attn_ws_bytes, stream, inverse_rotary);
    });
    if (!fused_rotary) {
      timed("rotary", [&] {
        cuda::glm_rotary_qkv(dqkv, T, heads(), head_dim(), d_positions, d_block_positions, true,
                             stream);
      });
    }
    if (!last(0)) {
      timed("bwd gemm_nn", [&] { nn(T, dqkv, w.qkv_w, da, H(), 3 * H(), dh); });  // + alpha dh
    }
    timed("bwd lora", [&] { lora_backward(l, 0, s.a, s.u[0], dqkv, last(0) ? nullptr : da); });
    if (last(0)) return;
    // a = LN1(x): the layer input's gradient becomes the next dout.
    timed("bwd layernorm", [&] {
      cuda::layer_norm_backward(x, half_ptr(w.ln1_w), s.mean1, s.rstd1, da, T, H(), dout, nullptr,
                                nullptr, stream);
    });
  }

  void backward() {
    // The cross-entropy left dnormed in dm (the last layer's R output rows).
    cuda::layer_norm_backward(xs[static_cast<std::size_t>(L())], half_ptr(final_w), mean_f, rstd_f,
                              dm, rows_after_attention(L() - 1), H(), dout, nullptr, nullptr,
                              stream);
    const auto lowest = lowest_adapted();  // nothing below it is trained
    for (int l = L() - 1; l >= lowest.first; --l) layer_backward(l, lowest);
  }

  void zero_grads() {
    const std::size_t grads = factor_floats;  // the second half of the arena
    QG_CUDA_CHECK(cudaMemsetAsync(factors() + factor_floats, 0, grads * sizeof(float), stream));
  }

  // Per-example summed NLL from row_nll (one value per labelled row).
  std::vector<double> example_nll() {
    std::vector<float> rows(labelled_example.size());
    QG_CUDA_CHECK(cudaMemcpyAsync(rows.data(), row_nll, rows.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream));
    QG_CUDA_CHECK(cudaStreamSynchronize(stream));
    profiler->collect();
    std::vector<double> out(row_start.size() - 1, 0.0);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      out[static_cast<std::size_t>(labelled_example[i])] += rows[i];
    }
    return out;
  }
};

CudaModelGrad::CudaModelGrad(const io::ModelConfig& config,
                             const model::GlmModel::WeightSource& source,
                             const lora::LoraAdapter& adapter, int device,
                             const CudaGradOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  config.validate("CudaModelGrad");
  QG_CHECK(device >= 0 && device < cuda::device_count(), "CudaModelGrad: no CUDA device ", device,
           " (", cuda::device_count(), " present)");
  QG_CHECK(options.ce_row_chunk > 0, "CudaModelGrad: ce_row_chunk must be positive");
  QG_CHECK(adapter.num_layers() == config.num_layers, "CudaModelGrad: LoRA adapter has ",
           adapter.num_layers(), " layers, the model ", config.num_layers);
  s.config = config;
  s.options = options;
  s.lora_config = adapter.config();
  s.device = device;
  QG_CHECK(s.lora_config.r >= 1 && s.lora_config.r <= 64, "CudaModelGrad: LoRA rank ",
           s.lora_config.r, " outside [1, 64]");
  s.backend = model::make_cuda_backend(device);
  QG_CUDA_CHECK(cudaSetDevice(device));
  QG_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  s.profiler = std::make_unique<cuda::OpProfiler>(s.stream);

  const Index H = config.hidden_size, I = config.inner_hidden_size, V = config.vocab_size;
  std::size_t elements = static_cast<std::size_t>(V * H * 2 + 2 * H) +
                         static_cast<std::size_t>(config.num_layers) *
                             static_cast<std::size_t>(4 * H * H + 2 * H * I + 4 * H + 3 * H + I + H);
  s.backend->plan_weights(elements);
  auto load = [&](const std::string& name, Index rows, Index cols) {
    const std::vector<std::int64_t> shape =
        rows == 1 ? std::vector<std::int64_t>{cols} : std::vector<std::int64_t>{rows, cols};
    const io::TensorView* view = source(name, shape);
    QG_CHECK(view != nullptr, "CudaModelGrad: the checkpoint has no tensor '", name, "'");
    QG_CHECK(view->shape == shape, "CudaModelGrad: tensor '", name, "' has shape ",
             view->shape_string(), ", expected ", rows == 1 ? "[" + std::to_string(cols) + "]"
                                                             : "[" + std::to_string(rows) + ", " +
                                                                   std::to_string(cols) + "]");
    return s.backend->upload(*view, rows, cols);
  };
  s.embeddings = load("transformer.word_embeddings.weight", V, H);
  for (int l = 0; l < config.num_layers; ++l) {
    const std::string p = "transformer.layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.ln1_w = load(p + "input_layernorm.weight", 1, H);
    w.ln1_b = load(p + "input_layernorm.bias", 1, H);
    w.qkv_w = load(p + "attention.query_key_value.weight", 3 * H, H);
    w.qkv_b = load(p + "attention.query_key_value.bias", 1, 3 * H);
    w.dense_w = load(p + "attention.dense.weight", H, H);
    w.dense_b = load(p + "attention.dense.bias", 1, H);
    w.ln2_w = load(p + "post_attention_layernorm.weight", 1, H);
    w.ln2_b = load(p + "post_attention_layernorm.bias", 1, H);
    w.w1 = load(p + "mlp.dense_h_to_4h.weight", I, H);
    w.b1 = load(p + "mlp.dense_h_to_4h.bias", 1, I);
    w.w2 = load(p + "mlp.dense_4h_to_h.weight", H, I);
    w.b2 = load(p + "mlp.dense_4h_to_h.bias", 1, H);
    s.layers.push_back(std::move(w));
  }
  s.final_w = load("transformer.final_layernorm.weight", 1, H);
  s.final_b = load("transformer.final_layernorm.bias", 1, H);
  const io::TensorView* head = source("lm_head.weight", {V, H});
  s.lm_head = head != nullptr ? s.backend->upload(*head, V, H) : s.embeddings;
  QG_CUDA_CHECK(cudaDeviceSynchronize());

  // LoRA slots: [A, B] of every adapted (layer, target), then the same for the gradients.
  s.slots.assign(static_cast<std::size_t>(config.num_layers), {});
  std::size_t offset = 0;
  for (int l = 0; l < config.num_layers; ++l) {
    for (int t = 0; t < kTargets; ++t) {
      const LoraTarget target = lora::kLoraTargets[t];
      if (!adapter.has(l, target)) continue;
      QG_CHECK(adapter.features(target) == lora::target_features(target, config),
               "CudaModelGrad: LoRA adapter of ", lora::target_module(target),
               " was made for another model shape");
      LoraSlot& slot = s.slots[static_cast<std::size_t>(l)][t];
      slot.present = true;
      std::tie(slot.in, slot.out) = lora::target_features(target, config);
      const std::size_t na = static_cast<std::size_t>(s.lora_config.r * slot.in);
      const std::size_t nb = static_cast<std::size_t>(slot.out * s.lora_config.r);
      slot.a = offset;
      slot.b = offset + na;
      offset += na + nb;
      const std::string a = lora_parameter_name(l, target, 'A');
      const std::string b = lora_parameter_name(l, target, 'B');
      s.names.push_back(a);
      s.names.push_back(b);
      s.name_offset[a] = {slot.a, na};
      s.name_offset[b] = {slot.b, nb};
    }
  }
  QG_CHECK(!s.names.empty(), "CudaModelGrad: the LoRA adapter has no factors to train");
  s.factor_floats = offset;
  for (auto& layer : s.slots) {
    for (LoraSlot& slot : layer) {
      slot.da = slot.a + offset;
      slot.db = slot.b + offset;
    }
  }
  s.lora_memory.reserve(2 * offset * sizeof(float), "LoRA factors");
  for (int l = 0; l < config.num_layers; ++l) {
    for (int t = 0; t < kTargets; ++t) {
      if (!s.slots[static_cast<std::size_t>(l)][t].present) continue;
      const lora::LoraFactors f = adapter.factors(l, lora::kLoraTargets[t]);
      const LoraSlot& slot = s.slots[static_cast<std::size_t>(l)][t];
      QG_CUDA_CHECK(cudaMemcpy(s.factors() + slot.a, f.a,
                               static_cast<std::size_t>(f.rank * slot.in) * sizeof(float),
                               cudaMemcpyHostToDevice));
      QG_CUDA_CHECK(cudaMemcpy(s.factors() + slot.b, f.b,
                               static_cast<std::size_t>(slot.out * f.rank) * sizeof(float),
                               cudaMemcpyHostToDevice));
    }
  }
}

CudaModelGrad::~CudaModelGrad() = default;

std::string CudaModelGrad::device_name() const {
  return "cuda:" + std::to_string(impl_->device) + " (" +
         cuda::device_description(impl_->device) + ")";
}

const std::vector<std::string>& CudaModelGrad::trainable() const { return impl_->names; }

const lora::LoraConfig& CudaModelGrad::lora_config() const { return impl_->lora_config; }

std::size_t CudaModelGrad::parameter_size(const std::string& name) const {
  const auto it = impl_->name_offset.find(name);
  QG_CHECK(it != impl_->name_offset.end(), "CudaModelGrad: no trainable parameter '", name, "'");
  return it->second.second;
}

void CudaModelGrad::set_parameter(const std::string& name, const std::vector<float>& values) {
  set_parameters({{name, values}});
}

void CudaModelGrad::set_parameters(const std::map<std::string, std::vector<float>>& values) {
  for (const auto& [name, v] : values) {
    const std::size_t n = parameter_size(name);
    QG_CHECK(v.size() == n, "CudaModelGrad: ", v.size(), " values for '", name, "' of ", n,
             " elements");
    const std::size_t offset = impl_->name_offset.at(name).first;
    QG_CUDA_CHECK(cudaMemcpyAsync(impl_->factors() + offset, v.data(), n * sizeof(float),
                                  cudaMemcpyHostToDevice, impl_->stream));
  }
  QG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

LossAndGrad CudaModelGrad::loss_and_grad(const std::vector<const TrainingExample*>& batch,
                                         const std::vector<std::uint64_t>& dropout_seeds,
                                         double normalizer, float loss_scale, bool dropout) {
  Impl& s = *impl_;
  QG_CHECK(normalizer > 0, "CudaModelGrad: normalizer must be positive");
  QG_CHECK(loss_scale > 0 && std::isfinite(loss_scale), "CudaModelGrad: bad loss scale ",
           loss_scale);
  QG_CUDA_CHECK(cudaSetDevice(s.device));
  s.begin_batch(batch, dropout_seeds);
  s.dropout = dropout;
  s.zero_grads();
  s.forward(true, loss_scale, normalizer);
  s.backward();
  LossAndGrad result;
  const std::vector<double> nll = s.example_nll();  // synchronises the stream
  for (std::size_t e = 0; e < batch.size(); ++e) {
    result.loss += nll[e];
    result.tokens += batch[e]->scored_tokens();
  }
  result.loss /= normalizer;
  std::vector<float> host(s.factor_floats);
  QG_CUDA_CHECK(cudaMemcpy(host.data(), s.factors() + s.factor_floats,
                           host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  const float unscale = 1.0f / loss_scale;
  for (const std::string& name : s.names) {
    const auto [offset, n] = s.name_offset.at(name);
    std::vector<float>& g = result.grads[name];
    g.resize(n);
    for (std::size_t i = 0; i < n; ++i) g[i] = host[offset + i] * unscale;
  }
  return result;
}

std::vector<double> CudaModelGrad::summed_nll(const std::vector<const TrainingExample*>& batch) {
  Impl& s = *impl_;
  QG_CUDA_CHECK(cudaSetDevice(s.device));
  s.begin_batch(batch, std::vector<std::uint64_t>(batch.size(), 0));
  s.dropout = false;
  s.forward(false, 1.0f, 1.0);
  return s.example_nll();
}

void CudaModelGrad::benchmark_step(const std::vector<const TrainingExample*>& batch,
                                   float loss_scale) {
  Impl& s = *impl_;
  QG_CUDA_CHECK(cudaSetDevice(s.device));
  double scored = 0;
  for (const TrainingExample* e : batch) scored += e->scored_tokens();
  s.begin_batch(batch, std::vector<std::uint64_t>(batch.size(), 1));
  s.dropout = true;
  s.zero_grads();
  s.forward(true, loss_scale, std::max(scored, 1.0));
  s.backward();
  QG_CUDA_CHECK(cudaStreamSynchronize(s.stream));
  s.profiler->collect();
}

void CudaModelGrad::reserve(std::int64_t tokens) {
  QG_CHECK(tokens > 0, "CudaModelGrad: reserve needs a positive token count");
  QG_CUDA_CHECK(cudaSetDevice(impl_->device));
  try {
    impl_->reserve_tokens(tokens);
  } catch (const Error& e) {
    fail(e.what(), "; memory plan for ", tokens, " tokens: ", memory_plan(tokens).to_string());
  }
}

CudaTrainMemoryPlan CudaModelGrad::memory_plan(std::int64_t tokens) const {
  Impl& s = *impl_;
  CudaTrainMemoryPlan plan;
  const Index H = s.config.hidden_size, I = s.config.inner_hidden_size, V = s.config.vocab_size;
  plan.weights = static_cast<std::size_t>(V * H) * 2 * (s.lm_head.data() == s.embeddings.data() ? 1 : 2) +
                 static_cast<std::size_t>(s.config.num_layers) *
                     static_cast<std::size_t>(4 * H * H + 2 * H * I + 9 * H + I) * 2;
  plan.lora = 2 * s.factor_floats * sizeof(float);
  Impl measure;  // carve() only needs the shapes
  measure.config = s.config;
  measure.options = s.options;
  measure.lora_config = s.lora_config;
  measure.slots = s.slots;
  const std::size_t arena = measure.carve(nullptr, tokens);
  plan.activations = std::min(arena, s.activation_bytes(tokens));
  plan.workspace = arena - plan.activations;
  return plan;
}

}  // namespace qg::train
