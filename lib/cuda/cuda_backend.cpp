// The CUDA backend: the Backend contract in fp16 on one GPU, on one stream, with our own
// kernels (gemm.h, attention.h, layer_norm.h, elementwise.h) — cuBLAS is not used here.
// Weights are converted to fp16 once at load; activations come from a caching allocator;
// the KV cache is a paged block pool shared by every sequence; logits leave as float32.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <vector>

#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_allocator.h"
#include "cuda/op_profiler.h"
#include "qinggeng/cuda/attention.h"
#include "qinggeng/cuda/convert.h"
#include "qinggeng/cuda/device.h"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/kv_pool.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/cuda/lora.h"
#include "qinggeng/cuda/quant_gemm.h"
#include "qinggeng/cuda/sampling.h"
#include "qinggeng/error.h"

namespace qg::model {
namespace {

const __half* h(const Tensor& t) { return static_cast<const __half*>(t.data()); }
__half* h(Tensor& t) { return static_cast<__half*>(t.data()); }
const std::uint16_t* u16(const Tensor& t) { return static_cast<const std::uint16_t*>(t.data()); }

void check_f16(const Tensor& t, std::int64_t rows, std::int64_t cols, const char* what) {
  QG_CHECK(t.device() == Device::Cuda && t.dtype() == DType::F16, "cuda backend: ", what,
           " must be an fp16 device tensor");
  QG_CHECK(t.rows() == rows && t.cols() == cols, "cuda backend: ", what, " is ", t.shape_string(),
           ", expected [", rows, ", ", cols, "]");
}

double gib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024 * 1024); }

/// One sequence's share of the paged pool: its block table grows as tokens arrive.
class CudaKvCache final : public KvCache {
 public:
  CudaKvCache(std::shared_ptr<cuda::KvBlockPool> pool, int capacity)
      : KvCache(capacity), pool_(std::move(pool)) {}
  ~CudaKvCache() override { pool_->release(table_); }
  std::vector<int>& table() { return table_; }
  cuda::KvBlockPool& pool() { return *pool_; }

 private:
  std::shared_ptr<cuda::KvBlockPool> pool_;
  std::vector<int> table_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const CudaBackendOptions& options)
      : device_(device), options_(options), alloc_(std::make_shared<cuda::DeviceAllocator>()) {
    QG_CHECK(device >= 0 && device < cuda::device_count(), "cuda:", device,
             ": no such CUDA device (", cuda::device_count(), " present)");
    QG_CUDA_CHECK(cudaSetDevice(device));
    QG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    QG_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
    profiler_ = std::make_unique<cuda::OpProfiler>(stream_);
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    profiler_.reset();
    sampler_.reset();
    for (auto& stack : lora_stacks_) stack.reset();
    pool_.reset();
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda:" + std::to_string(device_); }
  Device device() const override { return Device::Cuda; }

  Tensor upload(const io::TensorView& w, std::int64_t rows, std::int64_t cols) override {
    QG_CHECK(w.numel() == rows * cols, "cuda backend: tensor '", w.name, "' has ", w.numel(),
             " elements, expected ", rows, " x ", cols);
    Tensor t = device_tensor(DType::F16, rows, cols, w.name.c_str());
    const std::size_t n = static_cast<std::size_t>(rows * cols);
    if (w.dtype == DType::F16) {
      QG_CUDA_CHECK(cudaMemcpyAsync(t.data(), w.data, n * 2, cudaMemcpyHostToDevice, stream_));
    } else {
      // Convert on the host in slices so a 6B model needs no second full-size host copy.
      std::vector<float> f32;
      std::vector<std::uint16_t> f16;
      const std::size_t slice = std::size_t(1) << 22;
      const std::size_t esize = dtype_size(w.dtype);
      for (std::size_t begin = 0; begin < n; begin += slice) {
        const std::size_t count = std::min(slice, n - begin);
        f32.resize(count);
        f16.resize(count);
        convert_to_f32(w.dtype, w.data + begin * esize, f32.data(), count);
        for (std::size_t i = 0; i < count; ++i) f16[i] = float_to_half(f32[i]);
        QG_CUDA_CHECK(cudaMemcpyAsync(static_cast<std::uint16_t*>(t.data()) + begin, f16.data(),
                                      count * 2, cudaMemcpyHostToDevice, stream_));
        QG_CUDA_CHECK(cudaStreamSynchronize(stream_));  // f16 is reused by the next slice
      }
    }
    if (options_.quantize && is_layer_linear(w.name)) return quantize(t, w.name);
    weight_bytes_ += n * 2;
    return t;
  }

  Tensor activation(std::int64_t rows, std::int64_t cols) override {
    return device_tensor(DType::F16, rows, cols, "activations");
  }
  Tensor logits_buffer(std::int64_t rows, std::int64_t cols) override {
    return device_tensor(DType::F32, rows, cols, "logits");
  }

  void plan_weights(std::size_t elements) override {
    std::size_t free_bytes = 0, total = 0;
    QG_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
    // Quantized layers take about 1 (int8) or 0.55 (int4) bytes per weight instead of 2.
    const double per_weight = !options_.quantize ? 2.0
                              : options_.quant_scheme == tensor::QuantScheme::Int8PerChannel ? 1.05 : 0.55;
    const std::size_t need = static_cast<std::size_t>(static_cast<double>(elements) * per_weight);
    QG_CHECK(need < free_bytes, "the model's weights need about ", gib(need), " GiB but only ",
             gib(free_bytes), " of ", gib(total), " GiB are free on ",
             cuda::device_description(device_));
  }

  void prepare_kv_cache(int num_layers, const AttentionShape& shape) override {
    alloc_->release_cached();  // fp16 staging of quantized weights goes back to the driver
    if (!pool_) create_pool(num_layers, shape);
  }

  std::unique_ptr<KvCache> new_kv_cache(int num_layers, const AttentionShape& shape,
                                        int capacity) override {
    if (!pool_) create_pool(num_layers, shape);
    const auto& s = pool_->shape();
    QG_CHECK(s.num_layers == num_layers && s.num_heads == shape.num_heads &&
                 s.head_dim == shape.head_dim,
             "cuda backend: one backend serves one model shape (its KV pool is ", s.num_layers,
             " layers x ", s.num_heads, " heads x ", s.head_dim, ")");
    return std::make_unique<CudaKvCache>(pool_, capacity);
  }

  void embedding(const Tensor& table, const std::vector<int>& ids, Tensor& out) override {
    const auto timing = profiler_->scope("embedding");
    check_f16(out, static_cast<std::int64_t>(ids.size()), table.cols(), "embedding output");
    for (int id : ids) {
      QG_CHECK(id >= 0 && id < table.rows(), "token id ", id, " outside [0, ", table.rows(), ")");
    }
    auto d_ids = upload_ints(ids.data(), ids.size());
    cuda::embedding(h(table), table.rows(), table.cols(), static_cast<const int*>(d_ids.get()),
                    static_cast<std::int64_t>(ids.size()), h(out), stream_);
  }

  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                  Tensor& out) override {
    const auto timing = profiler_->scope("layer_norm");
    check_f16(gamma, 1, x.cols(), "layer_norm gamma");
    check_f16(beta, 1, x.cols(), "layer_norm beta");
    check_f16(out, x.rows(), x.cols(), "layer_norm output");
    cuda::layer_norm(h(x), h(gamma), h(beta), eps, x.rows(), x.cols(), h(out), stream_);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    cuda::GemmEpilogue ep;
    if (!bias.empty()) {
      ep.kind = cuda::GemmEpilogue::Kind::Bias;
      ep.bias = u16(bias);
    }
    gemm(x, w, bias, ep, out);
  }

  void linear_gelu(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    QG_CHECK(!bias.empty(), "cuda backend: linear_gelu needs a bias");
    cuda::GemmEpilogue ep;
    ep.kind = cuda::GemmEpilogue::Kind::BiasGelu;
    ep.bias = u16(bias);
    gemm(x, w, bias, ep, out);
  }

  void linear_residual(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& residual,
                       float alpha, Tensor& out) override {
    QG_CHECK(!bias.empty(), "cuda backend: linear_residual needs a bias");
    check_f16(residual, x.rows(), w.rows(), "linear_residual residual");
    cuda::GemmEpilogue ep;
    ep.kind = cuda::GemmEpilogue::Kind::BiasResidual;
    ep.bias = u16(bias);
    ep.residual = u16(residual);
    ep.alpha = alpha;
    if (!aliases(out, x)) {  // the GEMM reads x while writing out; residual may alias out
      gemm(x, w, bias, ep, out);
      return;
    }
    Tensor tmp = activation(out.rows(), out.cols());
    gemm(x, w, bias, ep, tmp);
    QG_CUDA_CHECK(cudaMemcpyAsync(out.data(), tmp.data(), tmp.nbytes(), cudaMemcpyDeviceToDevice, stream_));
  }

  void gelu(Tensor& x) override {
    const auto timing = profiler_->scope("gelu");
    cuda::gelu_tanh(h(x), x.numel(), stream_);
  }

  void scaled_add(const Tensor& a, float alpha, const Tensor& b, Tensor& out) override {
    const auto timing = profiler_->scope("scaled_add");
    check_f16(b, a.rows(), a.cols(), "scaled_add b");
    check_f16(out, a.rows(), a.cols(), "scaled_add output");
    cuda::scaled_add(h(a), alpha, h(b), a.numel(), h(out), stream_);
  }

  void load_adapter(int id, const lora::LoraAdapter& adapter) override {
    QG_CHECK(id >= 0 && id < options_.max_adapters, "LoRA adapter id ", id, " outside [0, ",
             options_.max_adapters, ")");
    QG_CHECK(adapter.rank() <= 64, "LoRA rank ", adapter.rank(), " exceeds 64, the largest the ",
             "CUDA kernels take");
    for (lora::LoraTarget t : {lora::LoraTarget::QueryKeyValue, lora::LoraTarget::Dense,
                               lora::LoraTarget::DenseHTo4H, lora::LoraTarget::Dense4HToH}) {
      auto& stack = lora_stacks_[static_cast<int>(t)];
      bool used = false;
      for (int l = 0; l < adapter.num_layers() && !used; ++l) used = adapter.has(l, t);
      if (!used) {
        if (stack && stack->loaded(id)) stack->unload(id);
        continue;
      }
      if (!stack) {
        stack = std::make_unique<cuda::GpuLoraStack>(t, adapter_model_config(adapter),
                                                     options_.max_adapters, 64);
      }
      stack->load(id, adapter);
    }
    if (static_cast<int>(adapter_loaded_.size()) <= id) adapter_loaded_.resize(static_cast<std::size_t>(id) + 1);
    adapter_loaded_[static_cast<std::size_t>(id)] = true;
  }

  void lora_add(const Tensor& x, Tensor& y, int layer, lora::LoraTarget target) override {
    const auto& stack = lora_stacks_[static_cast<int>(target)];
    if (!stack || !row_adapters_) return;
    const auto timing = profiler_->scope("lora_add");
    const auto view = stack->layer(layer);
    const std::size_t bytes = cuda::lora_add_workspace_bytes(view, x.rows());
    auto workspace = alloc_->allocate(bytes, "LoRA workspace");
    cuda::lora_add_f16(view, u16(x), static_cast<std::uint16_t*>(y.data()), x.rows(),
                       static_cast<const std::int32_t*>(row_adapters_.get()), workspace.get(),
                       bytes, stream_);
  }

  void begin_forward(const std::vector<SequenceChunk>& batch) override {
    const auto timing = profiler_->scope("begin_forward (metadata upload)");
    std::vector<std::int32_t> row_ids;
    bool any_adapter = false;
    for (const auto& chunk : batch) {
      QG_CHECK(chunk.adapter < 0 || (static_cast<std::size_t>(chunk.adapter) < adapter_loaded_.size() &&
                                     adapter_loaded_[static_cast<std::size_t>(chunk.adapter)]),
               "LoRA adapter ", chunk.adapter, " is not loaded");
      any_adapter |= chunk.adapter >= 0;
      row_ids.insert(row_ids.end(), chunk.tokens.size(), chunk.adapter);
    }
    row_adapters_.reset();
    if (any_adapter) row_adapters_ = upload_ints(row_ids.data(), row_ids.size());
    std::vector<cuda::AttentionSequence> seqs;
    seqs.reserve(batch.size());
    for (const auto& chunk : batch) {
      auto& cache = static_cast<CudaKvCache&>(*chunk.cache);
      const int n = static_cast<int>(chunk.tokens.size());
      cache.pool().reserve(cache.table(), cache.length() + n);
      cuda::AttentionSequence s;
      s.past = cache.length();
      s.context_length = chunk.context_length;
      s.positions = chunk.positions;
      s.block_positions = chunk.block_positions;
      s.block_table = &cache.table();
      seqs.push_back(std::move(s));
    }
    attention_batch_ = metadata_.build(seqs, pool_->shape().block_size, stream_);
    if (attention_batch_.max_new_tokens == 1) {
      const std::size_t floats = cuda::attention_decode_workspace_floats(
          attention_batch_.num_seqs, pool_->shape().num_heads, pool_->shape().head_dim);
      workspace_ = alloc_->allocate(floats * sizeof(float), "attention workspace");
    } else {
      workspace_.reset();
    }
  }

  void attention(const Tensor& qkv, const std::vector<SequenceChunk>& batch, int layer,
                 const AttentionShape& shape, Tensor& out) override {
    const auto timing = profiler_->scope(attention_batch_.max_new_tokens == 1 ? "attention (decode)" : "attention (prefill)");
    const std::int64_t H = static_cast<std::int64_t>(shape.num_heads) * shape.head_dim;
    check_f16(qkv, attention_batch_.total_tokens, 3 * H, "attention qkv");
    check_f16(out, attention_batch_.total_tokens, H, "attention output");
    QG_CHECK(static_cast<int>(batch.size()) == attention_batch_.num_seqs,
             "cuda backend: attention called with a batch begin_forward did not see");
    cuda::attention_forward(h(qkv), attention_batch_, pool_->layer(layer), h(out),
                            static_cast<float*>(workspace_.get()), num_sms_, stream_);
  }

  void gather_rows(const Tensor& x, const std::vector<std::int64_t>& rows, Tensor& out) override {
    const auto timing = profiler_->scope("gather_rows");
    check_f16(out, static_cast<std::int64_t>(rows.size()), x.cols(), "gather_rows output");
    auto d_rows = alloc_->allocate(rows.size() * sizeof(std::int64_t), "row indices");
    QG_CUDA_CHECK(cudaMemcpyAsync(d_rows.get(), rows.data(), rows.size() * sizeof(std::int64_t),
                                  cudaMemcpyHostToDevice, stream_));
    cuda::gather_rows(h(x), x.rows(), x.cols(), static_cast<const std::int64_t*>(d_rows.get()),
                      static_cast<std::int64_t>(rows.size()), h(out), stream_);
    QG_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host vector dies with this call
  }

  void to_host(const Tensor& t, float* out) override {
    QG_CHECK(t.device() == Device::Cuda, "cuda backend: to_host of a host tensor");
    const std::size_t n = static_cast<std::size_t>(t.numel());
    if (t.dtype() == DType::F32) {
      QG_CUDA_CHECK(cudaMemcpyAsync(out, t.data(), n * 4, cudaMemcpyDeviceToHost, stream_));
    } else {
      auto tmp = alloc_->allocate(n * 4, "to_host staging");
      cuda::f16_to_f32(u16(t), static_cast<float*>(tmp.get()), n, stream_);
      QG_CUDA_CHECK(cudaMemcpyAsync(out, tmp.get(), n * 4, cudaMemcpyDeviceToHost, stream_));
    }
    QG_CUDA_CHECK(cudaStreamSynchronize(stream_));
    profiler_->collect();
  }

  bool samples_on_device() const override { return true; }

  std::vector<int> sample_tokens(const Tensor& logits,
                                 const std::vector<engine::SamplingConfig>& configs,
                                 const std::vector<const std::vector<int>*>& histories,
                                 const std::vector<std::uint64_t>& steps) override {
    QG_CHECK(logits.device() == Device::Cuda && logits.dtype() == DType::F32,
             "cuda backend: sample_tokens needs float32 device logits");
    const auto timing = profiler_->scope("sampling");
    if (!sampler_) sampler_ = std::make_unique<cuda::GpuSampler>(1, 1);
    std::vector<std::vector<int>> seen;
    seen.reserve(histories.size());
    for (const auto* h : histories) seen.push_back(h ? *h : std::vector<int>());
    auto ids = sampler_->sample_to_host(static_cast<const float*>(logits.data()),
                                        static_cast<int>(logits.rows()), static_cast<int>(logits.cols()),
                                        configs, seen, steps, stream_);
    profiler_->collect();
    return ids;
  }

  std::string memory_report() const override {
    std::size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    char buf[512];
    const std::size_t kv = pool_ ? static_cast<std::size_t>(pool_->num_blocks()) *
                                       cuda::KvBlockPool::bytes_per_block(pool_->shape())
                                 : 0;
    std::snprintf(buf, sizeof buf,
                  "%s: weights %.2f GiB, KV cache %.2f GiB (%d tokens), workspace %.2f GiB, "
                  "%.2f of %.2f GiB free",
                  cuda::device_description(device_).c_str(), gib(weight_bytes_), gib(kv),
                  pool_ ? pool_->num_blocks() * pool_->shape().block_size : 0,
                  gib(alloc_->held_bytes() - weight_bytes_), gib(free_bytes), gib(total));
    return buf;
  }

 private:
  Tensor device_tensor(DType dtype, std::int64_t rows, std::int64_t cols, const char* what) {
    auto storage = alloc_->allocate(static_cast<std::size_t>(rows * cols) * dtype_size(dtype), what);
    void* data = storage.get();
    return Tensor(dtype, Device::Cuda, rows, cols, std::move(storage), data);
  }

  std::shared_ptr<void> upload_ints(const int* values, std::size_t n) {
    auto d = alloc_->allocate(n * sizeof(int), "token ids");
    QG_CUDA_CHECK(cudaMemcpyAsync(d.get(), values, n * sizeof(int), cudaMemcpyHostToDevice, stream_));
    QG_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host vector may die after the call
    return d;
  }

  // The four per-layer linear weights are what quantization stores smaller (embeddings,
  // lm_head, norms and biases stay fp16).
  static bool is_layer_linear(const std::string& name) {
    for (const char* suffix : {"attention.query_key_value.weight", "attention.dense.weight",
                               "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"}) {
      const std::string sfx = suffix;
      if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
        return true;
      }
    }
    return false;
  }

  /// Replaces the fp16 weight `t` by its quantized form (the fp16 copy is freed); the
  /// returned tensor's data is the quantized bytes, its dtype I8 (int8) or U8 (packed int4).
  Tensor quantize(const Tensor& t, const std::string& name) {
    const auto scheme = options_.quant_scheme;
    const std::int64_t N = t.rows(), K = t.cols();
    const std::size_t data_bytes = tensor::quant_data_bytes(scheme, N, K);
    const std::size_t scale_bytes = tensor::quant_scale_count(scheme, N, K) * 2;
    auto data = alloc_->allocate(data_bytes, name.c_str());
    auto scales = alloc_->allocate(scale_bytes, name.c_str());
    const auto qw = cuda::quantize_weight(u16(t), scheme, N, K, data.get(),
                                          static_cast<std::uint16_t*>(scales.get()), name.c_str(), stream_);
    quantized_[data.get()] = qw;
    weight_bytes_ += data_bytes + scale_bytes;
    max_quantized_elements_ = std::max<std::size_t>(max_quantized_elements_, static_cast<std::size_t>(N * K));
    // One owner keeps both buffers alive for as long as the tensor is.
    auto owner = std::make_shared<std::pair<std::shared_ptr<void>, std::shared_ptr<void>>>(data, scales);
    void* ptr = data.get();
    const DType dtype = scheme == tensor::QuantScheme::Int8PerChannel ? DType::I8 : DType::U8;
    return Tensor(dtype, Device::Cuda, N, K, std::shared_ptr<void>(owner, ptr), ptr);
  }

  // The model shape a GpuLoraStack needs, from the adapter's own feature sizes.
  static io::ModelConfig adapter_model_config(const lora::LoraAdapter& adapter) {
    io::ModelConfig c;
    c.num_layers = adapter.num_layers();
    c.hidden_size = adapter.features(lora::LoraTarget::Dense).first;
    c.inner_hidden_size = adapter.features(lora::LoraTarget::DenseHTo4H).second;
    return c;
  }

  static bool aliases(const Tensor& a, const Tensor& b) {
    const char* pa = static_cast<const char*>(a.data());
    const char* pb = static_cast<const char*>(b.data());
    return pa < pb + b.nbytes() && pb < pa + a.nbytes();
  }

  void gemm(const Tensor& x, const Tensor& w, const Tensor& bias, const cuda::GemmEpilogue& ep,
            Tensor& out) {
    const std::int64_t M = x.rows(), K = x.cols(), N = w.rows();
    check_f16(x, M, K, "linear input");
    if (w.dtype() != DType::F16) {
      quant_gemm(x, w, ep, out);
      return;
    }
    check_f16(w, N, K, "linear weight");
    if (!bias.empty()) check_f16(bias, 1, N, "linear bias");
    QG_CHECK(out.rows() == M && out.cols() == N, "cuda backend: linear output is ",
             out.shape_string(), ", expected [", M, ", ", N, "]");
    const auto timing = profiler_->scope(
        profiler_->enabled() ? "gemm N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                   (M <= cuda::kGemmSkinnyMaxM ? " (skinny)" : " (tiled)")
                             : std::string());
    cuda::gemm_f16(u16(x), u16(w), out.data(), out.dtype() == DType::F32, M, N, K, ep, stream_);
  }

  void quant_gemm(const Tensor& x, const Tensor& w, const cuda::GemmEpilogue& ep, Tensor& out) {
    const auto it = quantized_.find(w.data());
    QG_CHECK(it != quantized_.end() && w.cols() == x.cols(), "cuda backend: linear weight of dtype ",
             dtype_name(w.dtype()), " is not a quantized weight of this backend");
    const std::int64_t M = x.rows();
    QG_CHECK(out.rows() == M && out.cols() == w.rows(), "cuda backend: linear output is ",
             out.shape_string(), ", expected [", M, ", ", w.rows(), "]");
    const auto timing = profiler_->scope(
        profiler_->enabled() ? "quant gemm N=" + std::to_string(w.rows()) + " K=" + std::to_string(w.cols())
                             : std::string());
    std::shared_ptr<void> scratch;  // prefill multiplies a dequantized fp16 copy
    if (M > cuda::kQuantDecodeMaxM) {
      scratch = alloc_->allocate(max_quantized_elements_ * 2, "dequantized weight scratch");
    }
    cuda::quant_gemm(u16(x), it->second, out.data(), out.dtype() == DType::F32, M, ep, stream_,
                     static_cast<std::uint16_t*>(scratch.get()));
  }

  void create_pool(int num_layers, const AttentionShape& shape) {
    cuda::KvPoolShape s{num_layers, shape.num_heads, shape.head_dim, options_.kv_block_size};
    const std::size_t per_block = cuda::KvBlockPool::bytes_per_block(s);
    std::size_t free_bytes = 0, total = 0;
    QG_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
    std::size_t budget = options_.kv_cache_bytes;
    if (budget == 0) {
      const std::size_t reserve = std::max<std::size_t>(total / 10, std::size_t(1) << 30);
      budget = free_bytes > reserve ? free_bytes - reserve : 0;
      budget = std::min(budget, per_block * static_cast<std::size_t>(options_.max_kv_blocks));
    }
    const int blocks = static_cast<int>(budget / per_block);
    QG_CHECK(blocks > 0, "GPU memory too small for the KV cache: one block of ",
             s.block_size, " tokens needs ", per_block, " bytes, ", free_bytes,
             " bytes are free after the weights");
    pool_ = std::make_shared<cuda::KvBlockPool>(s, blocks);
  }

  int device_;
  CudaBackendOptions options_;
  std::shared_ptr<cuda::DeviceAllocator> alloc_;
  cudaStream_t stream_ = nullptr;
  int num_sms_ = 0;
  std::size_t weight_bytes_ = 0;
  std::shared_ptr<cuda::KvBlockPool> pool_;
  cuda::AttentionMetadata metadata_;
  cuda::AttentionBatch attention_batch_;
  std::shared_ptr<void> workspace_;
  std::unique_ptr<cuda::OpProfiler> profiler_;
  std::unique_ptr<cuda::GpuSampler> sampler_;
  std::unique_ptr<cuda::GpuLoraStack> lora_stacks_[4];  // by lora::LoraTarget
  std::vector<bool> adapter_loaded_;                    // by adapter id
  std::shared_ptr<void> row_adapters_;                  // int32 [tokens] of this forward, or null
  std::map<const void*, cuda::QuantizedWeight> quantized_;  // by the weight tensor's data
  std::size_t max_quantized_elements_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(device, options);
}

}  // namespace qg::model
