// Backend: the operations the ChatGLM forward pass is written against, once. The CPU
// reference backend implements them in plain float32; the CUDA backend implements the same
// contract with fp16 kernels. GlmModel never branches on the backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qinggeng/engine/sampler.h"
#include "qinggeng/error.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/tensor/tensor.h"

namespace qg::model {

/// \brief Per-sequence attention cache of one model: post-rotary keys and values of every
/// processed token, for every layer. Created by Backend::new_kv_cache.
class KvCache {
 public:
  virtual ~KvCache() = default;
  /// \brief Tokens whose keys/values are stored.
  int length() const { return length_; }
  /// \brief Tokens the cache can hold (the model's max sequence length unless smaller).
  int capacity() const { return capacity_; }
  /// \brief Forgets everything after the first `n` tokens (n <= length()).
  void truncate(int n);
  /// \brief Marks `n` more tokens as stored (called by the model after all layers wrote them).
  void advance(int n);

 protected:
  explicit KvCache(int capacity) : capacity_(capacity) {}

 private:
  int length_ = 0;
  int capacity_ = 0;
};

/// \brief One sequence's share of a batched forward call.
struct SequenceChunk {
  KvCache* cache = nullptr;          ///< the sequence's cache; new keys/values are appended
  std::vector<int> tokens;           ///< new token ids (appended after cache->length())
  std::vector<int> positions;        ///< first 2-D position id per new token
  std::vector<int> block_positions;  ///< second 2-D position id per new token
  int context_length = 0;            ///< GLM ctx: keys < ctx are visible to every query
  bool all_logits = false;           ///< logits for every new token, else only the last
  int adapter = -1;                  ///< LoRA adapter id applied to this sequence, -1 none
};

/// \brief Geometry the attention op needs (from ModelConfig).
struct AttentionShape {
  int num_heads = 0;
  int head_dim = 0;
};

/// \brief The compute operations of the ChatGLM forward pass.
///
/// Activations are [tokens, features] tensors of the backend's compute dtype; rows of a
/// batched call are the concatenated new tokens of every SequenceChunk, in order.
class Backend {
 public:
  virtual ~Backend() = default;
  /// \brief "cpu" or "cuda:0" style name, for messages.
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  /// \brief Copies a stored weight (any floating dtype) into the backend's weight format as a
  /// [rows, cols] matrix (a 1-D tensor of n elements is [1, n]).
  virtual Tensor upload(const io::TensorView& weight, std::int64_t rows, std::int64_t cols) = 0;
  /// \brief An uninitialised activation tensor [rows, cols].
  virtual Tensor activation(std::int64_t rows, std::int64_t cols) = 0;
  /// \brief An uninitialised float32 tensor for the logits (linear() may write it).
  virtual Tensor logits_buffer(std::int64_t rows, std::int64_t cols) { return activation(rows, cols); }
  /// \brief A cache for one sequence of up to `capacity` tokens of a model of this shape.
  virtual std::unique_ptr<KvCache> new_kv_cache(int num_layers, const AttentionShape& shape,
                                                int capacity) = 0;

  /// \brief out[i] = table[ids[i]] (ids validated by the caller).
  virtual void embedding(const Tensor& table, const std::vector<int>& ids, Tensor& out) = 0;
  /// \brief out = LayerNorm(x) * gamma + beta over each row.
  virtual void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                          Tensor& out) = 0;
  /// \brief out = x W^T (+ bias), W is [out_features, in_features]; bias may be empty.
  virtual void linear(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& out) = 0;
  /// \brief out = gelu_tanh(x W^T + bias) (a backend may fuse it into the product).
  virtual void linear_gelu(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& out) {
    linear(x, weight, bias, out);
    gelu(out);
  }
  /// \brief normed = LayerNorm(x) * gamma + beta, then out = normed W^T + bias, through
  /// gelu_tanh when `gelu`: layer_norm followed by linear or linear_gelu, which a backend may
  /// fuse (normed is written either way; it must not alias x or out).
  virtual void layer_norm_linear(const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 float eps, Tensor& normed, const Tensor& weight,
                                 const Tensor& bias, bool gelu, Tensor& out) {
    layer_norm(x, gamma, beta, eps, normed);
    if (gelu) {
      linear_gelu(normed, weight, bias, out);
    } else {
      linear(normed, weight, bias, out);
    }
  }
  /// \brief out = residual * alpha + (x W^T + bias); out may alias residual.
  virtual void linear_residual(const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& residual, float alpha, Tensor& out) {
    Tensor product = activation(x.rows(), weight.rows());
    linear(x, weight, bias, product);
    scaled_add(residual, alpha, product, out);
  }
  /// \brief Makes `adapter` available as runtime LoRA adapter `id` (replacing any adapter of
  /// that id); sequences select it with SequenceChunk::adapter.
  virtual void load_adapter(int id, const lora::LoraAdapter& adapter) = 0;
  /// \brief y += scale * (x A^T) B^T for every row whose sequence's adapter adapts `target`
  /// of `layer` (the adapter of each row is known from begin_forward's batch).
  virtual void lora_add(const Tensor& x, Tensor& y, int layer, lora::LoraTarget target) = 0;
  /// \brief Called by the model before the layers of each forward with that call's batch
  /// (caches grow here; a backend may prepare per-call state shared by every layer).
  virtual void begin_forward(const std::vector<SequenceChunk>& batch) { (void)batch; }
  /// \brief x = gelu_tanh(x), in place.
  virtual void gelu(Tensor& x) = 0;
  /// \brief out = a * alpha + b (GLM's residual from the normed input); out may alias b.
  virtual void scaled_add(const Tensor& a, float alpha, const Tensor& b, Tensor& out) = 0;
  /// \brief GLM self-attention for one layer over a batch of sequence chunks.
  ///
  /// qkv is [tokens, 3 * hidden] laid out per head as (q, k, v) slices of head_dim. Applies the
  /// 2-D rotary embedding to q and k (first half of each head by `positions`, second half by
  /// `block_positions`), appends k and v to each chunk's cache at layer `layer`, and writes
  /// softmax(q k^T / sqrt(head_dim) + GLM mask) v to out [tokens, hidden].
  virtual void attention(const Tensor& qkv, const std::vector<SequenceChunk>& batch, int layer,
                         const AttentionShape& shape, Tensor& out) = 0;
  /// \brief out[i] = x[rows[i]].
  virtual void gather_rows(const Tensor& x, const std::vector<std::int64_t>& rows, Tensor& out) = 0;
  /// \brief Called before the weights are uploaded with their total element count, so a
  /// backend can refuse early and clearly when they will not fit.
  virtual void plan_weights(std::size_t elements) { (void)elements; }
  /// \brief Called once the weights are in place: a backend with a shared cache pool sizes
  /// and allocates it now, so the memory plan is known (and printed) at load.
  virtual void prepare_kv_cache(int num_layers, const AttentionShape& shape) {
    (void)num_layers;
    (void)shape;
  }
  /// \brief Turns the replay of decode steps from captured CUDA graphs on or off (a backend
  /// without graphs ignores it). Results are identical either way; off is for comparisons.
  virtual void set_decode_graphs(bool enabled) { (void)enabled; }
  /// \brief True when sample_tokens runs on the device (then only token ids leave it).
  virtual bool samples_on_device() const { return false; }
  /// \brief Picks one token per row of `logits` [rows, vocab] (a logits_buffer tensor) with
  /// each row's settings; `histories[r]` lists the tokens the repetition penalty sees (may be
  /// empty when that row's penalty is 1) and `steps[r]` positions the row's random stream.
  /// Only backends whose samples_on_device() is true implement it.
  virtual std::vector<int> sample_tokens(const Tensor& logits,
                                         const std::vector<engine::SamplingConfig>& configs,
                                         const std::vector<const std::vector<int>*>& histories,
                                         const std::vector<std::uint64_t>& steps) {
    (void)logits, (void)configs, (void)histories, (void)steps;
    throw Error(name() + " backend: sampling on the device is not available");
  }
  /// \brief One line on device memory (weights, KV cache, workspace), empty on the CPU.
  virtual std::string memory_report() const { return {}; }
  /// \brief Copies rows of a tensor to host float32 (converting from the compute dtype).
  virtual void to_host(const Tensor& t, float* out) = 0;
};

/// \brief The CPU reference backend (float32, multi-threaded).
/// \param threads worker threads for the matrix products; 0 means one per hardware thread.
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);

/// \brief True when this build has a CUDA backend and a CUDA device is present.
bool cuda_available();

/// \brief A backend by name: "cpu", "cuda" / "cuda:N", or "auto" (CUDA when available, else
/// the CPU). `weights` is "f16" (as loaded), or "int8" / "int4" to store the layers' linear
/// weights quantized (per-channel int8, or int4 in groups of 128; CUDA only).
/// \throws qg::Error for an unknown name, an unavailable device or an unsupported format.
std::unique_ptr<Backend> make_backend(const std::string& device, int cpu_threads = 0,
                                      const std::string& weights = "f16");

}  // namespace qg::model
