// The CUDA backend: the Backend contract in fp16 on one GPU, on one stream, with our own
// kernels (gemm.h, attention.h, layer_norm.h, elementwise.h) — cuBLAS is not used here.
// Weights are converted to fp16 once at load; activations come from a caching allocator;
// the KV cache is a paged block pool shared by every sequence; logits leave as float32.
//
// Decode steps (every sequence of the batch has one new token) take a second route. Their
// per-step inputs (token ids, attention metadata, block tables, adapter ids) are packed on
// the host into one pinned buffer and copied with one asynchronous copy into fixed device
// buffers (DecodeStepInputs), with no host synchronisation. Then, for each batch size (and
// with or without LoRA rows), the first step runs op by op and measures the memory the step
// touches, the second is captured into a CUDA graph, and later ones replay it: GlmModel still
// calls every op, but they only count, and the lm_head product (the one op writing float32)
// launches the graph. A captured step works in a private arena (StepArena) instead of the
// model's activation tensors, so its addresses stay fixed; only the logits tensor it returns
// lies in that arena (valid until the next decode step). The attention kernels of a graph
// are sized by capacities and read the step's lengths from the device.
#include "cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda/check.h"
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
const std::uint16_t* u16(const Tensor& t) { return static_cast<const std::uint16_t*>(t.data()); }

void check_f16(const Tensor& t, std::int64_t rows, std::int64_t cols, const char* what) {
  QG_CHECK(t.device() == Device::Cuda && t.dtype() == DType::F16, "cuda backend: ", what,
           " must be an fp16 device tensor");
  QG_CHECK(t.rows() == rows && t.cols() == cols, "cuda backend: ", what, " is ", t.shape_string(),
           ", expected [", rows, ", ", cols, "]");
}

/// Whether every tensor's data allows 16-byte vector access.
bool all_aligned16(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    if (reinterpret_cast<std::uintptr_t>(t->data()) % 16 != 0) return false;
  }
  return true;
}

double gib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024 * 1024); }

std::size_t align_up(std::size_t bytes, std::size_t unit) { return (bytes + unit - 1) / unit * unit; }

/// Small host-to-device uploads without a host synchronisation: the values go into a pinned
/// staging ring and from there by an asynchronous copy into device memory from the allocator.
/// A region of the ring is reused only after the copies that read it have finished (an
/// event), so the caller's vector may die right after the call.
class AsyncUploader {
 public:
  AsyncUploader() = default;
  ~AsyncUploader() {
    if (done_) cudaEventDestroy(done_);
    if (pinned_) cudaFreeHost(pinned_);
  }
  AsyncUploader(const AsyncUploader&) = delete;
  AsyncUploader& operator=(const AsyncUploader&) = delete;

  std::shared_ptr<void> upload(const void* data, std::size_t bytes, cuda::DeviceAllocator& alloc,
                               const char* what, cudaStream_t stream) {
    auto d = alloc.allocate(bytes, what);
    if (bytes == 0) return d;
    const std::size_t need = align_up(bytes, 256);
    if (!done_) QG_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    if (offset_ + need > capacity_) {
      QG_CUDA_CHECK(cudaEventSynchronize(done_));  // wrap around: earlier copies are done
      offset_ = 0;
      if (need > capacity_) {
        if (pinned_) QG_CUDA_CHECK(cudaFreeHost(pinned_));
        pinned_ = nullptr;
        capacity_ = 0;
        const std::size_t size = std::max<std::size_t>(need, std::size_t(1) << 20);
        QG_CUDA_CHECK(cudaMallocHost(&pinned_, size));
        capacity_ = size;
      }
    }
    char* staged = static_cast<char*>(pinned_) + offset_;
    std::memcpy(staged, data, bytes);
    QG_CUDA_CHECK(cudaMemcpyAsync(d.get(), staged, bytes, cudaMemcpyHostToDevice, stream));
    QG_CUDA_CHECK(cudaEventRecord(done_, stream));
    offset_ += need;
    return d;
  }

 private:
  void* pinned_ = nullptr;
  std::size_t capacity_ = 0, offset_ = 0;
  cudaEvent_t done_ = nullptr;
};

/// The per-step inputs of a decode step at fixed device addresses, so that a captured graph
/// reads each step's values. int32 layout for `rows` sequences: token ids [rows], row starts
/// [rows + 1], past lengths, context lengths, positions, block positions, adapter ids (each
/// [rows]), the batch's max kv length [1], then the block tables [rows, stride] (-1 padded).
/// A pinned buffer mirrors it; upload() fills the used part and copies it in one
/// asynchronous copy.
class DecodeStepInputs {
 public:
  DecodeStepInputs() = default;
  ~DecodeStepInputs() {
    free_buffers();
    if (uploaded_) cudaEventDestroy(uploaded_);
  }
  DecodeStepInputs(const DecodeStepInputs&) = delete;
  DecodeStepInputs& operator=(const DecodeStepInputs&) = delete;

  int rows() const { return rows_; }
  int stride() const { return stride_; }
  /// Bumped whenever the device buffer moves (graphs that read the old one are stale).
  std::uint64_t generation() const { return generation_; }
  const int* ids() const { return device_ + offset(kIds); }
  const std::int32_t* adapters() const { return device_ + offset(kAdapters); }
  /// The token ids of the last upload, as packed on the host.
  const int* staged_ids() const { return pinned_ + offset(kIds); }

  /// Packs `batch` (one token per chunk; `tables[s]` covers sequence s) and uploads it. A
  /// buffer too small is reallocated to at least `min_rows` x `min_stride` (waits for the
  /// device).
  void upload(const std::vector<SequenceChunk>& batch,
              const std::vector<const std::vector<int>*>& tables, int min_rows, int min_stride,
              cudaStream_t stream) {
    const int n = static_cast<int>(batch.size());
    int need_stride = 1;
    for (const auto* t : tables) need_stride = std::max(need_stride, static_cast<int>(t->size()));
    if (n > rows_ || need_stride > stride_) {
      reallocate(std::max({n, min_rows, rows_}), std::max({need_stride, min_stride, stride_}));
    }
    if (!uploaded_) {
      QG_CUDA_CHECK(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming));
    } else {
      QG_CUDA_CHECK(cudaEventSynchronize(uploaded_));  // the last copy may still read pinned_
    }
    int* p = pinned_;
    int max_kv_len = 0;
    p[offset(kRowStart)] = 0;
    for (int s = 0; s < n; ++s) {
      const SequenceChunk& c = batch[static_cast<std::size_t>(s)];
      const int past = c.cache->length();
      p[offset(kIds) + s] = c.tokens[0];
      p[offset(kRowStart) + s + 1] = s + 1;
      p[offset(kPast) + s] = past;
      p[offset(kContext) + s] = c.context_length;
      p[offset(kPositions) + s] = c.positions[0];
      p[offset(kBlockPositions) + s] = c.block_positions[0];
      p[offset(kAdapters) + s] = c.adapter;
      max_kv_len = std::max(max_kv_len, past + 1);
      const auto& table = *tables[static_cast<std::size_t>(s)];
      int* row = p + offset(kTables) + static_cast<std::size_t>(s) * stride_;
      std::memcpy(row, table.data(), table.size() * sizeof(int));
      std::fill(row + table.size(), row + stride_, -1);
    }
    p[offset(kMaxKvLen)] = max_kv_len;
    const std::size_t ints = offset(kTables) + static_cast<std::size_t>(n) * stride_;
    QG_CUDA_CHECK(cudaMemcpyAsync(device_, pinned_, ints * sizeof(int), cudaMemcpyHostToDevice, stream));
    QG_CUDA_CHECK(cudaEventRecord(uploaded_, stream));
  }

  /// The attention batch of an `n`-sequence decode step over these buffers: the grid is
  /// sized by the capacity (stride blocks of block_size tokens), the lengths are read on the
  /// device, so one captured launch serves every step of that batch size.
  cuda::AttentionBatch attention(int n, int block_size) const {
    cuda::AttentionBatch b;
    b.num_seqs = b.total_tokens = n;
    b.max_new_tokens = 1;
    b.max_kv_len = stride_ * block_size;
    b.max_blocks = stride_;
    b.row_start = device_ + offset(kRowStart);
    b.past = device_ + offset(kPast);
    b.context_length = device_ + offset(kContext);
    b.positions = device_ + offset(kPositions);
    b.block_positions = device_ + offset(kBlockPositions);
    b.block_tables = device_ + offset(kTables);
    b.max_kv_len_on_device = device_ + offset(kMaxKvLen);
    return b;
  }

 private:
  enum Segment { kIds, kRowStart, kPast, kContext, kPositions, kBlockPositions, kAdapters, kMaxKvLen, kTables };
  /// First int of a segment (the row starts hold rows + 1 entries, the max kv length one).
  std::size_t offset(Segment k) const {
    const std::size_t r = static_cast<std::size_t>(rows_);
    return k == kIds ? 0 : k == kRowStart ? r : k <= kMaxKvLen ? k * r + 1 : kMaxKvLen * r + 2;
  }

  void reallocate(int rows, int stride) {
    if (uploaded_) QG_CUDA_CHECK(cudaEventSynchronize(uploaded_));
    QG_CUDA_CHECK(cudaDeviceSynchronize());  // graphs or kernels may still read device_
    free_buffers();
    rows_ = rows;
    stride_ = stride;
    const std::size_t bytes = (offset(kTables) + static_cast<std::size_t>(rows) * stride) * sizeof(int);
    QG_CUDA_CHECK(cudaMalloc(&device_, bytes));
    QG_CUDA_CHECK(cudaMallocHost(&pinned_, bytes));
    ++generation_;
  }
  void free_buffers() {
    if (device_) cudaFree(device_);
    if (pinned_) cudaFreeHost(pinned_);
    device_ = pinned_ = nullptr;
  }

  int* device_ = nullptr;
  int* pinned_ = nullptr;
  int rows_ = 0, stride_ = 0;
  std::uint64_t generation_ = 0;
  cudaEvent_t uploaded_ = nullptr;
};

/// Device memory a captured decode step works in, so that its pointers stay fixed from one
/// replay to the next: every activation tensor the step's ops see is given a slice on first
/// sight (by its address), step buffers (the attention workspace) get slices too, and
/// transient scratch (LoRA, dequantisation) shares one region at the end. Without memory
/// (base null) it only measures: the first, op-by-op step of a batch size sizes the arena.
class StepArena {
 public:
  void reset(char* base, std::size_t slice_capacity, std::size_t scratch_capacity) {
    base_ = base;
    slice_capacity_ = slice_capacity;
    scratch_capacity_ = scratch_capacity;
    used_ = 0;
    scratch_ = 0;
    slices_.clear();
  }
  /// The slice standing for the tensor at `ptr` of `bytes` (a reused address of a larger
  /// tensor gets a fresh slice).
  void* slice_for(const void* ptr, std::size_t bytes) {
    auto it = slices_.find(ptr);
    if (it != slices_.end() && it->second.second >= bytes) return base_ ? base_ + it->second.first : nullptr;
    const std::size_t at = take(bytes);
    slices_[ptr] = {at, bytes};
    return base_ ? base_ + at : nullptr;
  }
  /// A fresh slice (lives for the whole step).
  void* slice(std::size_t bytes) {
    const std::size_t at = take(bytes);
    return base_ ? base_ + at : nullptr;
  }
  /// The shared scratch region (valid until the next op).
  void* scratch(std::size_t bytes) {
    scratch_ = std::max(scratch_, align_up(bytes, 256));
    QG_CHECK(!base_ || scratch_ <= scratch_capacity_, "cuda backend: a decode step graph needs ",
             scratch_, " bytes of scratch, its warm-up step measured ", scratch_capacity_);
    return base_ ? base_ + slice_capacity_ : nullptr;
  }
  bool contains(const void* p) const {
    return base_ && static_cast<const char*>(p) >= base_ &&
           static_cast<const char*>(p) < base_ + slice_capacity_ + scratch_capacity_;
  }
  std::size_t slice_bytes() const { return used_; }
  std::size_t scratch_bytes() const { return scratch_; }

 private:
  std::size_t take(std::size_t bytes) {
    const std::size_t at = used_;
    used_ += align_up(bytes == 0 ? 1 : bytes, 256);
    QG_CHECK(!base_ || used_ <= slice_capacity_, "cuda backend: a decode step graph needs more than the ",
             slice_capacity_, " bytes its warm-up step measured");
    return at;
  }
  char* base_ = nullptr;
  std::size_t slice_capacity_ = 0, scratch_capacity_ = 0, used_ = 0, scratch_ = 0;
  std::unordered_map<const void*, std::pair<std::size_t, std::size_t>> slices_;  // offset, bytes
};

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
    const char* env = std::getenv("QG_CUDA_GRAPHS");
    graphs_enabled_ = options_.decode_graphs && !(env && std::string(env) == "0");
    const char* fuse = std::getenv("QG_CUDA_FUSE_LN");
    fuse_layer_norm_ = options_.fuse_layer_norm || (fuse && std::string(fuse) == "1");
  }
  ~CudaBackend() override {
    abandon_step();
    cudaStreamSynchronize(stream_);
    for (auto& g : graphs_) cudaGraphExecDestroy(g.second.exec);
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
    weights_.insert(t.data());
    return t;
  }

  Tensor activation(std::int64_t rows, std::int64_t cols) override {
    return device_tensor(DType::F16, rows, cols, "activations");
  }
  Tensor logits_buffer(std::int64_t rows, std::int64_t cols) override {
    const bool graphed = step_.mode == StepMode::Capture || step_.mode == StepMode::Replay;
    if (!graphed || rows != step_.rows) return device_tensor(DType::F32, rows, cols, "logits");
    // The graph writes its own logits: hand out that buffer (until the next decode step).
    void* p = nullptr;
    if (step_.mode == StepMode::Capture) {
      p = arena_map_.slice(static_cast<std::size_t>(rows * cols) * sizeof(float));
      step_.logits = p;
    } else {
      p = graphs_.at(step_.key).logits;
    }
    return Tensor(DType::F32, Device::Cuda, rows, cols, std::shared_ptr<void>(arena_, p), p);
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
    const int block = options_.kv_block_size;
    max_cache_blocks_ = std::max(max_cache_blocks_, (capacity + block - 1) / block);
    const auto& s = pool_->shape();
    QG_CHECK(s.num_layers == num_layers && s.num_heads == shape.num_heads &&
                 s.head_dim == shape.head_dim,
             "cuda backend: one backend serves one model shape (its KV pool is ", s.num_layers,
             " layers x ", s.num_heads, " heads x ", s.head_dim, ")");
    return std::make_unique<CudaKvCache>(pool_, capacity);
  }

  void embedding(const Tensor& table, const std::vector<int>& ids, Tensor& out) override {
    if (replayed()) return;
    const auto timing = profiler_->scope("embedding");
    check_f16(out, static_cast<std::int64_t>(ids.size()), table.cols(), "embedding output");
    for (int id : ids) {
      QG_CHECK(id >= 0 && id < table.rows(), "token id ", id, " outside [0, ", table.rows(), ")");
    }
    // A decode step's ids are already on the device (begin_forward uploaded them).
    const int* d_ids = nullptr;
    std::shared_ptr<void> uploaded;
    if (step_.mode != StepMode::None && static_cast<int>(ids.size()) == step_.rows &&
        std::equal(ids.begin(), ids.end(), step_inputs_.staged_ids())) {
      d_ids = step_inputs_.ids();
    } else {
      QG_CHECK(step_.mode != StepMode::Capture, "cuda backend: the embedding of a captured decode "
               "step must read the ids begin_forward uploaded");
      uploaded = upload_ints(ids.data(), ids.size());
      d_ids = static_cast<const int*>(uploaded.get());
    }
    cuda::embedding(h(table), table.rows(), table.cols(), d_ids,
                    static_cast<std::int64_t>(ids.size()), static_cast<__half*>(dev(out)), stream_);
  }

  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                  Tensor& out) override {
    if (replayed()) return;
    const auto timing = profiler_->scope("layer_norm");
    check_f16(gamma, 1, x.cols(), "layer_norm gamma");
    check_f16(beta, 1, x.cols(), "layer_norm beta");
    check_f16(out, x.rows(), x.cols(), "layer_norm output");
    cuda::layer_norm(static_cast<const __half*>(dev(x)), h(gamma), h(beta), eps, x.rows(), x.cols(),
                     static_cast<__half*>(dev(out)), stream_);
  }

  void layer_norm_linear(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                         Tensor& normed, const Tensor& w, const Tensor& bias, bool gelu,
                         Tensor& out) override {
    // The fused kernel serves decode-sized fp16 products with a bias whose pointers allow its
    // 16-byte accesses (the layer norm kernel's vector path then, whose bits it reproduces).
    // (Its blocks write out and normed while others still read x, gamma, beta, w and bias.)
    const auto apart_from_inputs = [&](const Tensor& t) {
      for (const Tensor* in : {&x, &gamma, &beta, &w, &bias}) {
        if (aliases(t, *in)) return false;
      }
      return true;
    };
    const bool fused = fuse_layer_norm_ && x.rows() > 0 && x.rows() <= cuda::kGemmDecodeMaxM &&
                       w.dtype() == DType::F16 && out.dtype() == DType::F16 && !bias.empty() &&
                       x.cols() % 8 == 0 && all_aligned16({&x, &gamma, &beta, &normed, &w}) &&
                       apart_from_inputs(normed) && apart_from_inputs(out) && !aliases(normed, out);
    if (!fused) {
      Backend::layer_norm_linear(x, gamma, beta, eps, normed, w, bias, gelu, out);
      return;
    }
    if (replayed()) return;
    const auto timing = profiler_->scope("layer_norm + gemm (skinny)");
    const std::int64_t M = x.rows(), K = x.cols(), N = w.rows();
    check_f16(x, M, K, "layer_norm_linear input");
    check_f16(gamma, 1, K, "layer_norm gamma");
    check_f16(beta, 1, K, "layer_norm beta");
    check_f16(normed, M, K, "layer_norm output");
    check_f16(w, N, K, "linear weight");
    check_f16(bias, 1, N, "linear bias");
    check_f16(out, M, N, "linear output");
    cuda::GemmEpilogue ep;
    ep.kind = gelu ? cuda::GemmEpilogue::Kind::BiasGelu : cuda::GemmEpilogue::Kind::Bias;
    ep.bias = u16(bias);
    cuda::gemm_f16_layer_norm(static_cast<const std::uint16_t*>(dev(x)), u16(gamma), u16(beta), eps,
                              static_cast<std::uint16_t*>(dev(normed)), u16(w), dev(out), false, M,
                              N, K, ep, stream_);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    if (!replayed()) {
      cuda::GemmEpilogue ep;
      if (!bias.empty()) {
        ep.kind = cuda::GemmEpilogue::Kind::Bias;
        ep.bias = u16(bias);
      }
      gemm(x, w, bias, ep, out);
    }
    // The float32 product is the lm_head: the last op of a forward.
    if (out.dtype() == DType::F32 && step_.mode != StepMode::None) end_step();
  }

  void linear_gelu(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    if (replayed()) return;
    QG_CHECK(!bias.empty(), "cuda backend: linear_gelu needs a bias");
    cuda::GemmEpilogue ep;
    ep.kind = cuda::GemmEpilogue::Kind::BiasGelu;
    ep.bias = u16(bias);
    gemm(x, w, bias, ep, out);
  }

  void linear_residual(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& residual,
                       float alpha, Tensor& out) override {
    if (replayed()) return;
    QG_CHECK(!bias.empty(), "cuda backend: linear_residual needs a bias");
    check_f16(residual, x.rows(), w.rows(), "linear_residual residual");
    cuda::GemmEpilogue ep;
    ep.kind = cuda::GemmEpilogue::Kind::BiasResidual;
    ep.bias = u16(bias);
    ep.residual = static_cast<const std::uint16_t*>(dev(residual));
    ep.alpha = alpha;
    if (!aliases(out, x)) {  // the GEMM reads x while writing out; residual may alias out
      gemm(x, w, bias, ep, out);
      return;
    }
    Tensor tmp = activation(out.rows(), out.cols());
    gemm(x, w, bias, ep, tmp);
    QG_CUDA_CHECK(cudaMemcpyAsync(dev(out), dev(tmp), tmp.nbytes(), cudaMemcpyDeviceToDevice, stream_));
  }

  void gelu(Tensor& x) override {
    if (replayed()) return;
    const auto timing = profiler_->scope("gelu");
    cuda::gelu_tanh(static_cast<__half*>(dev(x)), x.numel(), stream_);
  }

  void scaled_add(const Tensor& a, float alpha, const Tensor& b, Tensor& out) override {
    if (replayed()) return;
    const auto timing = profiler_->scope("scaled_add");
    check_f16(b, a.rows(), a.cols(), "scaled_add b");
    check_f16(out, a.rows(), a.cols(), "scaled_add output");
    cuda::scaled_add(static_cast<const __half*>(dev(a)), alpha, static_cast<const __half*>(dev(b)),
                     a.numel(), static_cast<__half*>(dev(out)), stream_);
  }

  void load_adapter(int id, const lora::LoraAdapter& adapter) override {
    drop_graphs();  // the adapted modules (the ops of a step) and the factors may change
    footprints_.clear();
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
    if (replayed()) return;
    const auto& stack = lora_stacks_[static_cast<int>(target)];
    if (!stack || !row_adapters_) return;
    const auto timing = profiler_->scope("lora_add");
    const auto view = stack->layer(layer);
    const std::size_t bytes = cuda::lora_add_workspace_bytes(view, x.rows());
    std::shared_ptr<void> held;
    void* workspace = scratch(bytes, "LoRA workspace", held);
    cuda::lora_add_f16(view, static_cast<const std::uint16_t*>(dev(x)),
                       static_cast<std::uint16_t*>(dev(y)), x.rows(), row_adapters_, workspace,
                       bytes, stream_);
  }

  void begin_forward(const std::vector<SequenceChunk>& batch) override {
    abandon_step();  // a step a failed forward left open
    const auto timing = profiler_->scope("begin_forward (metadata upload)");
    bool any_adapter = false, decode = true;
    for (const auto& chunk : batch) {
      QG_CHECK(chunk.adapter < 0 || (static_cast<std::size_t>(chunk.adapter) < adapter_loaded_.size() &&
                                     adapter_loaded_[static_cast<std::size_t>(chunk.adapter)]),
               "LoRA adapter ", chunk.adapter, " is not loaded");
      any_adapter |= chunk.adapter >= 0;
      decode = decode && chunk.tokens.size() == 1 && chunk.positions.size() == 1 &&
               chunk.block_positions.size() == 1;
    }
    row_adapters_ = nullptr;
    row_adapters_upload_.reset();
    workspace_.reset();
    attention_workspace_ = nullptr;
    if (decode && !batch.empty()) {
      begin_decode_step(batch, any_adapter);
      return;
    }
    if (any_adapter) {
      std::vector<std::int32_t> row_ids;
      for (const auto& chunk : batch) row_ids.insert(row_ids.end(), chunk.tokens.size(), chunk.adapter);
      row_adapters_upload_ = upload_ints(row_ids.data(), row_ids.size());
      row_adapters_ = static_cast<const std::int32_t*>(row_adapters_upload_.get());
    }
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
  }

  void attention(const Tensor& qkv, const std::vector<SequenceChunk>& batch, int layer,
                 const AttentionShape& shape, Tensor& out) override {
    if (replayed()) return;
    const auto timing = profiler_->scope(attention_batch_.max_new_tokens == 1 ? "attention (decode)" : "attention (prefill)");
    const std::int64_t H = static_cast<std::int64_t>(shape.num_heads) * shape.head_dim;
    check_f16(qkv, attention_batch_.total_tokens, 3 * H, "attention qkv");
    check_f16(out, attention_batch_.total_tokens, H, "attention output");
    QG_CHECK(static_cast<int>(batch.size()) == attention_batch_.num_seqs,
             "cuda backend: attention called with a batch begin_forward did not see");
    cuda::attention_forward(static_cast<const __half*>(dev(qkv)), attention_batch_, pool_->layer(layer),
                            static_cast<__half*>(dev(out)), attention_workspace_, num_sms_, stream_);
  }

  void gather_rows(const Tensor& x, const std::vector<std::int64_t>& rows, Tensor& out) override {
    if (replayed()) return;
    QG_CHECK(step_.mode != StepMode::Capture, "cuda backend: gather_rows in a captured decode step");
    const auto timing = profiler_->scope("gather_rows");
    check_f16(out, static_cast<std::int64_t>(rows.size()), x.cols(), "gather_rows output");
    auto d_rows = uploader_.upload(rows.data(), rows.size() * sizeof(std::int64_t), *alloc_,
                                   "row indices", stream_);
    cuda::gather_rows(static_cast<const __half*>(dev(x)), x.rows(), x.cols(),
                      static_cast<const std::int64_t*>(d_rows.get()),
                      static_cast<std::int64_t>(rows.size()), static_cast<__half*>(dev(out)), stream_);
  }

  void set_decode_graphs(bool enabled) override {
    abandon_step();
    graphs_enabled_ = enabled;
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
    return uploader_.upload(values, n * sizeof(int), *alloc_, "token ids", stream_);
  }

  // ---- decode steps: fixed inputs, measured arena, captured graphs (see the file comment) ----

  enum class StepMode {
    None,     ///< not in a decode step (prefill, or ops called on their own)
    Eager,    ///< decode step launched op by op (graphs off or not possible)
    Measure,  ///< op by op, measuring the memory a graph of this step needs
    Capture,  ///< ops recorded into a graph, launched by the lm_head op
    Replay,   ///< ops only counted; the lm_head op launches the captured graph
  };
  using GraphKey = std::pair<int, bool>;  // (sequences, any LoRA adapter)
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;
    int ops = 0;            // backend ops of the captured step (a replay must match)
    void* logits = nullptr; // where the graph writes the float32 logits
  };
  struct Footprint {
    std::size_t slices = 0, scratch = 0;
  };
  struct StepState {
    StepMode mode = StepMode::None;
    GraphKey key{0, false};
    int rows = 0;
    int ops = 0;
    void* logits = nullptr;
  };

  void begin_decode_step(const std::vector<SequenceChunk>& batch, bool any_adapter) {
    const int n = static_cast<int>(batch.size());
    std::vector<const std::vector<int>*> tables;
    tables.reserve(batch.size());
    for (const auto& chunk : batch) {
      auto& cache = static_cast<CudaKvCache&>(*chunk.cache);
      cache.pool().reserve(cache.table(), cache.length() + 1);
      tables.push_back(&cache.table());
    }
    step_inputs_.upload(batch, tables, std::max(n, options_.max_graph_rows), max_cache_blocks_, stream_);
    if (step_inputs_.generation() != graphs_inputs_generation_) {
      drop_graphs();  // the graphs read the old input buffers
      graphs_inputs_generation_ = step_inputs_.generation();
    }
    const auto& shape = pool_->shape();
    attention_batch_ = step_inputs_.attention(n, shape.block_size);
    if (any_adapter) row_adapters_ = step_inputs_.adapters();
    step_ = StepState{};
    step_.key = {n, any_adapter};
    step_.rows = n;
    const std::size_t workspace_bytes =
        cuda::attention_decode_workspace_floats(n, shape.num_heads, shape.head_dim) * sizeof(float);

    const bool graphs = graphs_enabled_ && !profiler_->enabled() && n <= options_.max_graph_rows;
    const auto graph = graphs_.find(step_.key);
    const auto footprint = footprints_.find(step_.key);
    if (!graphs) {
      step_.mode = StepMode::Eager;
    } else if (graph != graphs_.end()) {
      step_.mode = StepMode::Replay;
      return;
    } else if (footprint != footprints_.end() && reserve_arena(footprint->second, n)) {
      step_.mode = StepMode::Capture;
      arena_map_.reset(static_cast<char*>(arena_.get()), arena_slices_, arena_scratch_);
      attention_workspace_ = static_cast<float*>(arena_map_.slice(workspace_bytes));
      QG_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
      return;
    } else {
      step_.mode = StepMode::Measure;  // the first step of this size also warms up the kernels
      arena_map_.reset(nullptr, 0, 0);
      arena_map_.slice(workspace_bytes);
    }
    workspace_ = alloc_->allocate(workspace_bytes, "attention workspace");
    attention_workspace_ = static_cast<float*>(workspace_.get());
  }

  /// Counts an op of a decode step; true when the step is replayed (the op launches nothing).
  bool replayed() {
    if (step_.mode == StepMode::None) return false;
    ++step_.ops;
    return step_.mode == StepMode::Replay;
  }

  /// The device address an op uses for tensor `t`: in a captured step, activations are moved
  /// to the step's arena (weights and the arena's own logits stay); measuring records them.
  void* dev(const Tensor& t) {
    void* own = const_cast<void*>(t.data());  // outputs are written through this address
    if (step_.mode != StepMode::Capture && step_.mode != StepMode::Measure) return own;
    if (weights_.count(own) || arena_map_.contains(own)) return own;
    void* slice = arena_map_.slice_for(own, t.nbytes());
    return step_.mode == StepMode::Capture ? slice : own;
  }

  /// Scratch valid until the next op: the arena's scratch region in a captured step, else an
  /// allocation that `held` keeps alive.
  void* scratch(std::size_t bytes, const char* what, std::shared_ptr<void>& held) {
    if (step_.mode == StepMode::Capture) return arena_map_.scratch(bytes);
    if (step_.mode == StepMode::Measure) arena_map_.scratch(bytes);
    held = alloc_->allocate(bytes, what);
    return held.get();
  }

  /// Makes the arena big enough for a step of `n` rows that measured `f`; false when the
  /// memory is not there (the step then runs op by op).
  bool reserve_arena(const Footprint& f, int n) {
    const std::size_t slices = f.slices + f.slices / 8 + (std::size_t(1) << 16);
    if (arena_ && slices <= arena_slices_ && f.scratch <= arena_scratch_) return true;
    drop_graphs();  // they work in the old arena
    arena_.reset();
    // Activations grow with the rows: size the slices for the largest graphed batch at once.
    const std::size_t per_row = (slices + static_cast<std::size_t>(n) - 1) / static_cast<std::size_t>(n);
    const std::size_t want_slices = std::max({slices, arena_slices_, per_row * static_cast<std::size_t>(options_.max_graph_rows)});
    const std::size_t want_scratch = std::max(f.scratch, arena_scratch_);
    try {
      arena_ = alloc_->allocate(want_slices + want_scratch, "decode graph arena");
    } catch (const Error&) {
      try {
        arena_ = alloc_->allocate(slices + f.scratch, "decode graph arena");
      } catch (const Error&) {
        arena_slices_ = arena_scratch_ = 0;
        return false;
      }
      arena_slices_ = slices;
      arena_scratch_ = f.scratch;
      return true;
    }
    arena_slices_ = want_slices;
    arena_scratch_ = want_scratch;
    return true;
  }

  /// Ends a decode step at its lm_head op: stores what a Measure step measured, or
  /// instantiates and launches the captured graph, or launches the replayed one.
  void end_step() {
    const StepState step = step_;
    step_.mode = StepMode::None;
    switch (step.mode) {
      case StepMode::Measure:
        footprints_[step.key] = Footprint{arena_map_.slice_bytes(), arena_map_.scratch_bytes()};
        break;
      case StepMode::Capture: {
        cudaGraph_t graph = nullptr;
        const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
        cudaGraphExec_t exec = nullptr;
        cudaError_t made = ended;
        if (ended == cudaSuccess) made = cudaGraphInstantiate(&exec, graph, 0);
        if (graph) cudaGraphDestroy(graph);
        if (made != cudaSuccess) {
          cudaGetLastError();
          graphs_enabled_ = false;  // later steps run op by op
          fail("cuda backend: capturing the decode step of ", step.key.first,
               " sequences into a CUDA graph failed (", cudaGetErrorString(made),
               "); graphs are now off for this backend");
        }
        graphs_[step.key] = StepGraph{exec, step.ops, step.logits};
        QG_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
        break;
      }
      case StepMode::Replay: {
        const StepGraph& g = graphs_.at(step.key);
        QG_CHECK(step.ops == g.ops, "cuda backend: a decode step of ", step.key.first,
                 " sequences made ", step.ops, " ops, its captured graph ", g.ops);
        QG_CUDA_CHECK(cudaGraphLaunch(g.exec, stream_));
        break;
      }
      default:
        break;
    }
  }

  /// Closes a decode step that never reached its lm_head op (a forward that threw, or ops
  /// called on their own after begin_forward).
  void abandon_step() {
    if (step_.mode == StepMode::Capture) {
      cudaGraph_t graph = nullptr;
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
    }
    step_.mode = StepMode::None;
  }

  void drop_graphs() {
    if (graphs_.empty()) return;
    QG_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (auto& g : graphs_) QG_CUDA_CHECK(cudaGraphExecDestroy(g.second.exec));
    graphs_.clear();
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
    weights_.insert(data.get());
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
    QG_CHECK(out.device() == Device::Cuda, "cuda backend: linear output is not a device tensor");
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
    cuda::gemm_f16(static_cast<const std::uint16_t*>(dev(x)), u16(w), dev(out), out.dtype() == DType::F32,
                   M, N, K, ep, stream_);
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
    std::shared_ptr<void> held;  // prefill multiplies a dequantized fp16 copy
    void* dequantized = nullptr;
    if (M > cuda::kQuantDecodeMaxM) dequantized = scratch(max_quantized_elements_ * 2, "dequantized weight scratch", held);
    cuda::quant_gemm(static_cast<const std::uint16_t*>(dev(x)), it->second, dev(out), out.dtype() == DType::F32,
                     M, ep, stream_, static_cast<std::uint16_t*>(dequantized));
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
  std::shared_ptr<void> workspace_;      // owns attention_workspace_ outside captured steps
  float* attention_workspace_ = nullptr; // split-KV partials of a decode step, else null
  std::unique_ptr<cuda::OpProfiler> profiler_;
  std::unique_ptr<cuda::GpuSampler> sampler_;
  std::unique_ptr<cuda::GpuLoraStack> lora_stacks_[4];  // by lora::LoraTarget
  std::vector<bool> adapter_loaded_;                    // by adapter id
  const std::int32_t* row_adapters_ = nullptr;          // int32 [tokens] of this forward, or null
  std::shared_ptr<void> row_adapters_upload_;           // owns row_adapters_ of a prefill
  AsyncUploader uploader_;
  std::unordered_set<const void*> weights_;             // data of every uploaded weight
  // Decode steps.
  bool graphs_enabled_ = true;
  bool fuse_layer_norm_ = false;  // options_.fuse_layer_norm or QG_CUDA_FUSE_LN=1
  int max_cache_blocks_ = 0;                            // blocks of the largest cache made
  DecodeStepInputs step_inputs_;
  std::uint64_t graphs_inputs_generation_ = 0;
  StepState step_;
  StepArena arena_map_;
  std::shared_ptr<void> arena_;                         // slices, then scratch
  std::size_t arena_slices_ = 0, arena_scratch_ = 0;
  std::map<GraphKey, Footprint> footprints_;
  std::map<GraphKey, StepGraph> graphs_;
  std::map<const void*, cuda::QuantizedWeight> quantized_;  // by the weight tensor's data
  std::size_t max_quantized_elements_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(device, options);
}

}  // namespace qg::model
